// File input / output of the test harnesses in tests/cpp/ (raw little-endian arrays the Python
// tests write with numpy's tofile and read back with torch.from_file / numpy.fromfile).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace harness {

// exactly `bytes` bytes of the file at `path` (exits with status 2 when it has fewer)
inline std::vector<char> read_file(const char* path, size_t bytes) {
  std::vector<char> buf(bytes);
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(buf.data(), 1, bytes, f) != bytes) {
    std::fprintf(stderr, "cannot read %zu bytes from %s\n", bytes, path);
    std::exit(2);
  }
  std::fclose(f);
  return buf;
}

// writes v to `path`; 0 on success, 2 (with a message) otherwise
template <typename T>
int write_file(const char* path, const std::vector<T>& v) {
  FILE* f = std::fopen(path, "wb");
  if (!f || std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) {
    std::fprintf(stderr, "cannot write %s\n", path);
    return 2;
  }
  std::fclose(f);
  return 0;
}

}  // namespace harness
