# Extracts the committed tokenizer.json archives for the `tokenizer` test suite (a ctest
# fixture runs this): OUT_DIR/qwen3/tokenizer.json and OUT_DIR/llama3/tokenizer.json.
# Usage: cmake -DSRC_DIR=<tests/data/tokenizer> -DOUT_DIR=<dir> -P extract.cmake
cmake_minimum_required(VERSION 3.18)  # file(ARCHIVE_EXTRACT)
if(NOT SRC_DIR OR NOT OUT_DIR)
  message(FATAL_ERROR "extract.cmake: pass -DSRC_DIR=<tests/data/tokenizer> -DOUT_DIR=<output dir>")
endif()
foreach(name qwen3 llama3)
  set(archive "${SRC_DIR}/${name}-tokenizer.tar.xz")
  set(dest "${OUT_DIR}/${name}")
  if(NOT EXISTS "${archive}")
    message(FATAL_ERROR "extract.cmake: missing ${archive}")
  endif()
  # Skip the work when an extraction newer than the archive is already there.
  if(EXISTS "${dest}/tokenizer.json" AND "${dest}/tokenizer.json" IS_NEWER_THAN "${archive}")
    continue()
  endif()
  file(REMOVE_RECURSE "${dest}")
  file(MAKE_DIRECTORY "${dest}")
  file(ARCHIVE_EXTRACT INPUT "${archive}" DESTINATION "${dest}")
  if(NOT EXISTS "${dest}/tokenizer.json")
    message(FATAL_ERROR "extract.cmake: ${archive} holds no tokenizer.json")
  endif()
  # The archive stores mtime 0; touch the file so the freshness check above works.
  file(TOUCH "${dest}/tokenizer.json")
endforeach()
message(STATUS "tokenizer files in ${OUT_DIR}")
