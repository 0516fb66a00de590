# User-facing build options (documented in docs/build_options.md).
option(DISTILX_BUILD_TESTS "Build the test suite" ${DISTILX_IS_TOP_LEVEL})
option(DISTILX_BUILD_EXAMPLES "Build the distilx app and examples" ${DISTILX_IS_TOP_LEVEL})
option(DISTILX_BUILD_BENCH "Build the benchmarks" ${DISTILX_IS_TOP_LEVEL})
set(DISTILX_ENABLE_CUDA "AUTO" CACHE STRING "Build the CUDA backend target distilx::cuda: ON, OFF or AUTO (if nvcc is found)")
set_property(CACHE DISTILX_ENABLE_CUDA PROPERTY STRINGS ON OFF AUTO)
set(DISTILX_CUDA_ARCHITECTURES "90" CACHE STRING "CUDA architectures for distilx's CUDA targets (never 'native': CI has no GPU)")

if(DISTILX_IS_TOP_LEVEL AND NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES)
  set(CMAKE_BUILD_TYPE Release CACHE STRING "Build type" FORCE)
endif()
