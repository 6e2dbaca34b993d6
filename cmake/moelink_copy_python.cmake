# Script mode (cmake -P): copies python/moelink/**/*.py into the build-tree package. Globbing at
# build time, not configure time, picks up new modules without a re-configure. file(COPY) skips
# files whose timestamp and size already match.
if(NOT SOURCE_DIR OR NOT DEST_DIR)
  message(FATAL_ERROR "usage: cmake -DSOURCE_DIR=... -DDEST_DIR=... -P moelink_copy_python.cmake")
endif()
file(MAKE_DIRECTORY ${DEST_DIR})
file(GLOB_RECURSE _files RELATIVE ${SOURCE_DIR} ${SOURCE_DIR}/*.py ${SOURCE_DIR}/*.pyi ${SOURCE_DIR}/py.typed)
foreach(_file IN LISTS _files)
  if(_file MATCHES "__pycache__")
    continue()
  endif()
  get_filename_component(_subdir ${_file} DIRECTORY)
  file(COPY ${SOURCE_DIR}/${_file} DESTINATION ${DEST_DIR}/${_subdir})
endforeach()
