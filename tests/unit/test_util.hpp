// Helpers shared by the unit tests: a self-removing temporary directory, whole-file
// read/write, and an exception check that matches message fragments.
#pragma once

#include <unistd.h>

#include <boost/test/unit_test.hpp>

#include <filesystem>
#include <initializer_list>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>

namespace distilx::test_util {

/// A fresh directory under /tmp, removed with everything in it when the test ends.
struct TempDir {
  std::filesystem::path dir;
  explicit TempDir(const std::string& prefix = "distilx_test") {
    static int counter = 0;
    dir = std::filesystem::path("/tmp") / (prefix + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (dir / name).string(); }
  std::size_t entries() const {
    return static_cast<std::size_t>(std::distance(std::filesystem::directory_iterator(dir), {}));
  }
};

inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

inline void spit(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// Runs f, expecting an exception of type E whose message contains every fragment.
template <class E, class F>
void check_throws(F&& f, std::initializer_list<std::string> fragments) {
  try {
    f();
    BOOST_ERROR("no exception thrown");
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const auto& frag : fragments)
      BOOST_CHECK_MESSAGE(msg.find(frag) != std::string::npos, "message '" << msg << "' lacks '" << frag << "'");
  }
}

}  // namespace distilx::test_util
