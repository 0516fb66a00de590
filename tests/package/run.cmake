# Installs distilx from the build tree into a temporary prefix, then configures,
# builds and runs a consumer project that uses find_package(distilx CONFIG).
# Invoked by ctest: cmake -DSOURCE_DIR=... -DBINARY_DIR=... -DWORK_DIR=... -P run.cmake
file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BINARY_DIR} --prefix ${prefix} RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "install into ${prefix} failed (${rc})")
endif()
if(NOT EXISTS ${prefix}/lib/cmake/distilx/distilxConfig.cmake)
  message(FATAL_ERROR "distilxConfig.cmake was not installed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/package/consumer -B ${WORK_DIR}/build
                        -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=Release -DDISTILX_ENABLE_CUDA=OFF
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configuring the consumer project failed (${rc})")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK_DIR}/build RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "building the consumer project failed (${rc})")
endif()
execute_process(COMMAND ${WORK_DIR}/build/consumer RESULT_VARIABLE rc OUTPUT_VARIABLE out)
message(STATUS "consumer printed: ${out}")
if(rc OR NOT out MATCHES "trainable=")
  message(FATAL_ERROR "the consumer program failed (${rc}): ${out}")
endif()
