// Entry point of distilx_cuda_tests: without a CUDA device (CI) the binary reports
// itself skipped with exit code 77, which ctest's SKIP_RETURN_CODE turns into "skipped".
#define BOOST_TEST_NO_MAIN
#include <boost/test/unit_test.hpp>

#include <cstdio>

#include "distilx/backend/cuda/memory.cuh"

bool init_unit_test() { return true; }

int main(int argc, char** argv) {
  if (!distilx::cuda_device_available()) {
    std::printf("distilx_cuda_tests: no CUDA device, skipped\n");
    return 77;
  }
  return boost::unit_test::unit_test_main(&init_unit_test, argc, argv);
}
