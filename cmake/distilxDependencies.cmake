# Dependencies of distilx::distilx. Used both by the build and by the installed
# distilxConfig.cmake, so a consumer resolves exactly the same packages.
include(CMakeFindDependencyMacro)
find_dependency(Eigen3 3.4 NO_MODULE)
find_dependency(nlohmann_json 3)
find_dependency(cereal)
find_dependency(OpenMP)
find_dependency(Threads)
find_dependency(PkgConfig)
if(NOT TARGET PkgConfig::PCRE2)
  pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET GLOBAL libpcre2-8)
endif()
