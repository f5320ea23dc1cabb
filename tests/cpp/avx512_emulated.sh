#!/usr/bin/env bash
# Runs tests/cpp/isa_selftest.cpp on an emulated AVX-512 CPU (Bochs' Skylake-X model), so the
# AVX-512 variants of the C++ twins run on a machine without AVX-512 (most of ours are AMD Zen 3).
#
# What it does: builds the self-test as a static binary (g++, baseline x86-64; the twins' avx2 and
# avx512 variants come from their target pragmas), packs it with busybox into an initramfs, makes a
# GRUB boot ISO with this machine's Debian kernel, boots it in Bochs with
# `cpu: model=corei7_skylake_x`, and prints the self-test's output from the emulated serial port.
# The self-test requires AVX-512 there (--require-avx512) and compares every variant's outputs
# with the base variant's (exit status 0: all agree).
#
# Needs (Debian packages): bochs bochsbios vgabios linux-image-amd64 grub-pc-bin grub-common xorriso
# mtools busybox-static. About 10-30 minutes on one core (most of it the emulated kernel boot).
#
# `noxsaves clearcpuid=xsavec,xsaves` on the kernel command line: Bochs 2.7's Skylake-X reports
# the compacted (XSAVES / XSAVEC) area's size as the standard layout's, so Linux 6.1 finds "XSAVE
# consistency problem: size 2432 != kernel_size 2688" and turns XSAVE off, and AVX and AVX-512
# with it (XCR0 = 0). With both instructions hidden the kernel uses the standard layout, whose
# sizes agree, and enables the AVX-512 state (XCR0 = 0xe7). (Bochs' generic model cannot stand in:
# its CPUID leaf 7 is always zero in 2.7, so no AVX2 / AVX-512 is reported.)
#
# usage: [MARCH=skylake-avx512] bash tests/cpp/avx512_emulated.sh [WORKDIR]   (default /tmp/spar_avx512)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
work="${1:-/tmp/spar_avx512}"
mkdir -p "$work/root/bin" "$work/iso/boot/grub" "$work/obj"

kernel="$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -1 || true)"
for need in bochs grub-mkrescue xorriso busybox g++; do
  command -v "$need" >/dev/null || { echo "avx512_emulated: '$need' not found (see the packages above)" >&2; exit 2; }
done
[ -n "$kernel" ] || { echo "avx512_emulated: no /boot/vmlinuz-* (apt-get install linux-image-amd64)" >&2; exit 2; }


srcs=(adaln/adaln_cpu dwconv_glu/dwconv_glu_cpu linear_attention/linear_attention_cpu
      flow_sampler/flow_sampler_cpu quantize_fp8/quantize_fp8_cpu)
# MARCH: the build's own -march (the base variant's); skylake-avx512 stands for a package built
# with -march=native on an AVX-512 machine, where the base variant is 16 lanes wide too
march="${MARCH:-x86-64}"
flags=(-O2 -std=gnu++17 -march="$march" -I"$repo/csrc" -I"$here" -Wno-psabi)
echo "avx512_emulated: building the self-test (static, -march=$march)"
for s in "${srcs[@]}"; do g++ "${flags[@]}" -c "$repo/csrc/$s.cpp" -o "$work/obj/$(basename "$s").o"; done
g++ "${flags[@]}" -c "$here/isa_selftest.cpp" -o "$work/obj/main.o"
g++ -static "$work"/obj/*.o -o "$work/root/isa_selftest"

cp "$(command -v busybox)" "$work/root/bin/busybox"
cat > "$work/root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox echo "=== isa_selftest start"
/isa_selftest --require-avx512
s=$?
/bin/busybox sleep 3
/bin/busybox echo "=== isa_selftest exit $s"
/bin/busybox sleep 3
/bin/busybox poweroff -f
EOF
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$work/iso/boot/initrd.gz")
cp "$kernel" "$work/iso/boot/vmlinuz"
cat > "$work/iso/boot/grub/grub.cfg" <<'EOF'
set timeout=0
set default=0
serial --unit=0 --speed=115200
terminal_output serial
menuentry "isa_selftest" {
  linux /boot/vmlinuz console=ttyS0,115200 quiet loglevel=3 rdinit=/init nokaslr mitigations=off noxsaves clearcpuid=xsavec,xsaves
  initrd /boot/initrd.gz
}
EOF
grub-mkrescue -o "$work/boot.iso" "$work/iso" >/dev/null 2>&1

bios=/usr/share/bochs/BIOS-bochs-latest
vga=/usr/share/bochs/VGABIOS-lgpl-latest
[ -f "$vga" ] || vga=/usr/share/vgabios/vgabios.bin
cat > "$work/bochsrc" <<EOF
megs: 512
cpu: model=corei7_skylake_x, count=1, ips=200000000
romimage: file=$bios
vgaromimage: file=$vga
ata0-master: type=cdrom, path=$work/boot.iso, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev=$work/serial.txt
display_library: rfb, options="timeout=0"
log: $work/bochs.log
clock: sync=none
panic: action=fatal
info: action=ignore
EOF
echo c > "$work/debugger.rc"   # Debian's Bochs starts in its debugger: continue at once
rm -f "$work/serial.txt"
echo "avx512_emulated: booting in Bochs (Skylake-X); output in $work/serial.txt"
bochs -q -f "$work/bochsrc" -rc "$work/debugger.rc" > "$work/bochs.out" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
while kill -0 $pid 2>/dev/null; do
  if grep -q "=== isa_selftest exit" "$work/serial.txt" 2>/dev/null; then break; fi
  sleep 10
done
sleep 2
sed -n '/=== isa_selftest start/,/=== isa_selftest exit/p' "$work/serial.txt" | tr -d '\r'
status="$(sed -n 's/.*=== isa_selftest exit \([0-9]*\).*/\1/p' "$work/serial.txt" | tr -d '\r' | tail -1)"
[ -n "$status" ] || { echo "avx512_emulated: the self-test did not finish (see $work/bochs.out, $work/serial.txt)" >&2; exit 2; }
exit "$status"
