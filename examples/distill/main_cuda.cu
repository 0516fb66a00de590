// The distilx app built by nvcc: the same program as main.cpp with the CUDA backend
// available (`--device cuda`, `--precision`). CMake builds this instead of main.cpp
// whenever the CUDA toolkit is found.
#define DISTILX_APP_CUDA 1
#include "main.cpp"
