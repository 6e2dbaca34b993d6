# FindNVSHMEM
# -----------
# Finds NVSHMEM, in this order:
#   1. NVSHMEM_HOME or NVSHMEM_DIR (CMake cache variable or environment variable): an install prefix
#      with include/nvshmem.h and lib/libnvshmem_host.so*;
#   2. the pip wheel nvidia-nvshmem-cu13 (or -cu12) of ${Python3_EXECUTABLE}, else
#      ${Python_EXECUTABLE}, else the python3 on PATH: <site-packages>/nvidia/nvshmem/{include,lib}
#      (skip with -DNVSHMEM_SKIP_PIP=ON; under pip's build isolation that python may lack the wheel);
#   3. the system (CMAKE_PREFIX_PATH, /usr, distro layouts such as /usr/include/nvshmem_13).
#
# Result variables:
#   NVSHMEM_FOUND, NVSHMEM_VERSION, NVSHMEM_INCLUDE_DIRS, NVSHMEM_LIBRARY_DIR,
#   NVSHMEM_HOST_LIBRARY, NVSHMEM_DEVICE_LIBRARY (may be NOTFOUND)
# Imported targets:
#   NVSHMEM::host    libnvshmem_host.so; carries NVSHMEM's include dir and the CUDA toolkit's
#                    include and include/cccl (NVSHMEM's headers include <cuda_runtime.h> and
#                    <cuda/std/...>), and -Wl,-rpath to NVSHMEM_LIBRARY_DIR unless
#                    NVSHMEM_NO_RPATH is set, because a pip wheel's lib dir is never on the
#                    loader's default path.
#   NVSHMEM::device  libnvshmem_device.a, only needed by CUDA code that calls NVSHMEM device
#                    functions; the consumer must set CUDA_SEPARABLE_COMPILATION ON (and
#                    CUDA_RESOLVE_DEVICE_SYMBOLS ON on a shared library). Links NVSHMEM::host.
#
# The wheel ships only versioned names (libnvshmem_host.so.3, nvshmem_bootstrap_uid.so.3, ...), so
# the host library is looked up by its versioned file name too. Its bootstrap and transport plugins
# need nothing at run time: libnvshmem_host.so.3 carries RPATH $ORIGIN and dlopens them from its
# own directory.

include(FindPackageHandleStandardArgs)

set(_nvshmem_hints)

# 1. An explicit prefix wins over everything else.
foreach(_nvshmem_var NVSHMEM_HOME NVSHMEM_DIR)
  if(DEFINED ${_nvshmem_var} AND NOT "${${_nvshmem_var}}" STREQUAL "")
    list(APPEND _nvshmem_hints "${${_nvshmem_var}}")
  elseif(DEFINED ENV{${_nvshmem_var}} AND NOT "$ENV{${_nvshmem_var}}" STREQUAL "")
    list(APPEND _nvshmem_hints "$ENV{${_nvshmem_var}}")
  endif()
endforeach()

# 2. The pip wheel. nvidia/ and nvidia/nvshmem/ are namespace packages (no __init__.py), so the
# package has __path__ but no __file__.
if(DEFINED Python3_EXECUTABLE AND EXISTS "${Python3_EXECUTABLE}")
  set(_nvshmem_python "${Python3_EXECUTABLE}")
elseif(DEFINED Python_EXECUTABLE AND EXISTS "${Python_EXECUTABLE}")
  set(_nvshmem_python "${Python_EXECUTABLE}")
else()
  find_program(_nvshmem_python NAMES python3 python)
endif()
if(_nvshmem_python AND NOT NVSHMEM_SKIP_PIP)
  execute_process(
    COMMAND "${_nvshmem_python}" -c
      "import os, nvidia.nvshmem as m; f = getattr(m, '__file__', None); \
print(os.path.dirname(f) if f else list(m.__path__)[0])"
    OUTPUT_VARIABLE _nvshmem_pip_root
    OUTPUT_STRIP_TRAILING_WHITESPACE
    ERROR_QUIET
    RESULT_VARIABLE _nvshmem_pip_result)
  if(_nvshmem_pip_result EQUAL 0 AND IS_DIRECTORY "${_nvshmem_pip_root}")
    list(APPEND _nvshmem_hints "${_nvshmem_pip_root}")
  endif()
endif()

# 3. The system: find_* also search CMAKE_PREFIX_PATH and the default prefixes after the hints.
# Distro packages (libnvshmem3-dev-cuda-13) put files under nvshmem_<cuda major> subdirectories.
find_path(NVSHMEM_INCLUDE_DIR
  NAMES nvshmem.h
  HINTS ${_nvshmem_hints}
  PATH_SUFFIXES include include/nvshmem_13 include/nvshmem_12 nvshmem_13 nvshmem_12)

find_library(NVSHMEM_HOST_LIBRARY
  NAMES nvshmem_host libnvshmem_host.so.3 libnvshmem_host.so.2
  HINTS ${_nvshmem_hints}
  PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu/nvshmem/13 lib/x86_64-linux-gnu/nvshmem/12
                lib/aarch64-linux-gnu/nvshmem/13 lib/aarch64-linux-gnu/nvshmem/12)

if(NVSHMEM_HOST_LIBRARY)
  get_filename_component(NVSHMEM_LIBRARY_DIR "${NVSHMEM_HOST_LIBRARY}" DIRECTORY)
endif()

find_library(NVSHMEM_DEVICE_LIBRARY
  NAMES libnvshmem_device.a nvshmem_device
  HINTS ${NVSHMEM_LIBRARY_DIR} ${_nvshmem_hints}
  PATH_SUFFIXES lib lib64
  NO_DEFAULT_PATH)

# The CUDA toolkit's include and include/cccl: NVSHMEM's headers include <cuda_runtime.h>, <cuda.h>
# and, since CUDA 13 moved libcu++ there, <cuda/std/...> from include/cccl.
if(NOT CUDAToolkit_FOUND)
  find_package(CUDAToolkit QUIET)
endif()
set(_nvshmem_cuda_includes)
foreach(_nvshmem_dir ${CUDAToolkit_INCLUDE_DIRS})
  list(APPEND _nvshmem_cuda_includes "${_nvshmem_dir}")
  if(IS_DIRECTORY "${_nvshmem_dir}/cccl")
    list(APPEND _nvshmem_cuda_includes "${_nvshmem_dir}/cccl")
  endif()
endforeach()
if(NOT _nvshmem_cuda_includes)
  foreach(_nvshmem_root "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}" /usr/local/cuda)
    if(NOT "${_nvshmem_root}" STREQUAL "" AND EXISTS "${_nvshmem_root}/include/cuda_runtime.h")
      list(APPEND _nvshmem_cuda_includes "${_nvshmem_root}/include")
      if(IS_DIRECTORY "${_nvshmem_root}/include/cccl")
        list(APPEND _nvshmem_cuda_includes "${_nvshmem_root}/include/cccl")
      endif()
      break()
    endif()
  endforeach()
endif()
list(REMOVE_DUPLICATES _nvshmem_cuda_includes)

if(NVSHMEM_INCLUDE_DIR AND EXISTS "${NVSHMEM_INCLUDE_DIR}/non_abi/nvshmem_version.h")
  file(STRINGS "${NVSHMEM_INCLUDE_DIR}/non_abi/nvshmem_version.h" _nvshmem_version_lines
    REGEX "#define NVSHMEM_VENDOR_(MAJOR|MINOR|PATCH)_VERSION")
  foreach(_nvshmem_part MAJOR MINOR PATCH)
    string(REGEX MATCH "NVSHMEM_VENDOR_${_nvshmem_part}_VERSION[ \t]+([0-9]+)" _ "${_nvshmem_version_lines}")
    set(_nvshmem_${_nvshmem_part} "${CMAKE_MATCH_1}")
  endforeach()
  set(NVSHMEM_VERSION "${_nvshmem_MAJOR}.${_nvshmem_MINOR}.${_nvshmem_PATCH}")
endif()

find_package_handle_standard_args(NVSHMEM
  REQUIRED_VARS NVSHMEM_HOST_LIBRARY NVSHMEM_INCLUDE_DIR
  VERSION_VAR NVSHMEM_VERSION)

if(NVSHMEM_FOUND)
  set(NVSHMEM_INCLUDE_DIRS "${NVSHMEM_INCLUDE_DIR}" ${_nvshmem_cuda_includes})

  if(NOT TARGET NVSHMEM::host)
    add_library(NVSHMEM::host SHARED IMPORTED)
    set_target_properties(NVSHMEM::host PROPERTIES
      IMPORTED_LOCATION "${NVSHMEM_HOST_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${NVSHMEM_INCLUDE_DIRS}")
    # The soname is libnvshmem_host.so.3 whatever file name we found, so linking by full path
    # records the right DT_NEEDED; only the directory has to be made findable at run time.
    if(NOT NVSHMEM_NO_RPATH)
      set_property(TARGET NVSHMEM::host PROPERTY INTERFACE_LINK_OPTIONS "LINKER:-rpath,${NVSHMEM_LIBRARY_DIR}")
    endif()
  endif()

  if(NVSHMEM_DEVICE_LIBRARY AND NOT TARGET NVSHMEM::device)
    add_library(NVSHMEM::device STATIC IMPORTED)
    set_target_properties(NVSHMEM::device PROPERTIES
      IMPORTED_LOCATION "${NVSHMEM_DEVICE_LIBRARY}"
      IMPORTED_LINK_INTERFACE_LANGUAGES "CUDA"
      INTERFACE_LINK_LIBRARIES NVSHMEM::host)
  endif()
endif()

mark_as_advanced(NVSHMEM_INCLUDE_DIR NVSHMEM_HOST_LIBRARY NVSHMEM_DEVICE_LIBRARY _nvshmem_python)
unset(_nvshmem_hints)
unset(_nvshmem_pip_root)
unset(_nvshmem_pip_result)
unset(_nvshmem_cuda_includes)
