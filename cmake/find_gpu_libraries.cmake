# Where cuDNN (with its frontend headers) and NCCL are looked for, in this order: the folder given
# to CMake, the usual environment variables, scripts/install-{cudnn,nccl}.sh's .deps/, the CUDA
# toolkit, Python environments' NVIDIA wheels (the pip layout nvidia/<lib>/{include,lib}: the active
# virtual environment's and the GPU machine's torch venv), then the system's usual places
# (/usr/include, /usr/lib/x86_64-linux-gnu, /usr/local, ...); the first folder holding any of a
# library's names wins (NAMES_PER_DIR). Sets (cached, like find_path):
#   MOEFORGE_CUDNN_INCLUDE MOEFORGE_CUDNN_LIB MOEFORGE_CUDNN_FRONTEND_INCLUDE
#   MOEFORGE_NCCL_INCLUDE MOEFORGE_NCCL_LIB
# Included by the top CMakeLists.txt and by tests/cmake/find_gpu_libraries (fake installations).

# site-packages/nvidia/<name> of the active virtual environment (VIRTUAL_ENV) and of the GPU
# machine's torch venv.
function(moeforge_wheel_dirs name out)
  set(dirs "")
  foreach(venv $ENV{VIRTUAL_ENV} /opt/torch/.venv)
    file(GLOB found LIST_DIRECTORIES true "${venv}/lib/python3*/site-packages/nvidia/${name}")
    list(APPEND dirs ${found})
  endforeach()
  set(${out} ${dirs} PARENT_SCOPE)
endfunction()

macro(moeforge_find_cudnn)
  moeforge_wheel_dirs(cudnn _cudnn_wheels)
  set(_cudnn_hints ${MOEFORGE_CUDNN_ROOT} $ENV{CUDNN_PATH} $ENV{CUDNN_ROOT} $ENV{CUDNN_HOME} ${CMAKE_SOURCE_DIR}/.deps/cudnn
      ${CUDAToolkit_LIBRARY_ROOT} ${_cudnn_wheels})
  find_path(MOEFORGE_CUDNN_INCLUDE cudnn.h HINTS ${_cudnn_hints} PATH_SUFFIXES include NO_DEFAULT_PATH)
  find_path(MOEFORGE_CUDNN_INCLUDE cudnn.h PATH_SUFFIXES include)
  find_library(MOEFORGE_CUDNN_LIB NAMES cudnn libcudnn.so.9 NAMES_PER_DIR HINTS ${_cudnn_hints} PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH)
  find_library(MOEFORGE_CUDNN_LIB NAMES cudnn libcudnn.so.9 NAMES_PER_DIR PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu x86_64-linux-gnu)
  find_path(MOEFORGE_CUDNN_FRONTEND_INCLUDE cudnn_frontend.h
            HINTS ${MOEFORGE_CUDNN_ROOT}/frontend ${CMAKE_SOURCE_DIR}/.deps/cudnn/frontend $ENV{CUDNN_FRONTEND_PATH}
            PATH_SUFFIXES include NO_DEFAULT_PATH)
  find_path(MOEFORGE_CUDNN_FRONTEND_INCLUDE cudnn_frontend.h PATH_SUFFIXES include)
endmacro()

macro(moeforge_find_nccl)
  moeforge_wheel_dirs(nccl _nccl_wheels)
  set(_nccl_hints ${MOEFORGE_NCCL_ROOT} $ENV{NCCL_ROOT} $ENV{NCCL_HOME} ${CMAKE_SOURCE_DIR}/.deps/nccl
      ${CUDAToolkit_LIBRARY_ROOT} ${_nccl_wheels})
  find_path(MOEFORGE_NCCL_INCLUDE nccl.h HINTS ${_nccl_hints} ${CUDAToolkit_INCLUDE_DIRS} PATH_SUFFIXES include NO_DEFAULT_PATH)
  find_path(MOEFORGE_NCCL_INCLUDE nccl.h PATH_SUFFIXES include)
  # The pip wheel ships libnccl.so.2 without the unversioned link.
  find_library(MOEFORGE_NCCL_LIB NAMES nccl libnccl.so.2 NAMES_PER_DIR HINTS ${_nccl_hints} ${CUDAToolkit_LIBRARY_DIR}
               PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH)
  find_library(MOEFORGE_NCCL_LIB NAMES nccl libnccl.so.2 NAMES_PER_DIR PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu x86_64-linux-gnu)
endmacro()

# MOEFORGE_<ID> = OFF | AUTO | ON: OFF builds without the library; otherwise `finder` looks for it,
# and when any of the cache variables VARS is still unset, scripts/<script> fetches it (ON: always;
# AUTO: only where a GPU answers, MOEFORGE_GPU_HERE) and `finder` looks again. Sets
# MOEFORGE_<ID>_WHY to the reason when it is still missing ("" otherwise). `what`: its name in messages.
macro(moeforge_find_or_fetch id what finder script)
  set(MOEFORGE_${id}_WHY "")
  if(MOEFORGE_${id} STREQUAL "OFF")
    set(MOEFORGE_${id}_WHY "MOEFORGE_${id}=OFF")
  else()
    cmake_language(CALL ${finder})
    set(_missing OFF)
    foreach(_v ${ARGN})
      if(NOT ${_v})
        set(_missing ON)
      endif()
    endforeach()
    if(_missing AND (MOEFORGE_${id} STREQUAL "ON" OR MOEFORGE_GPU_HERE))
      message(STATUS "moeforge: ${what} not found; fetching it (scripts/${script}, from PyPI)")
      execute_process(COMMAND bash ${CMAKE_SOURCE_DIR}/scripts/${script} RESULT_VARIABLE _fetch_rc)
      foreach(_v ${ARGN})
        unset(${_v} CACHE)
      endforeach()
      cmake_language(CALL ${finder})
      if(NOT _fetch_rc EQUAL 0)
        set(MOEFORGE_${id}_WHY "fetching it failed (scripts/${script} needs PyPI)")
      endif()
    elseif(_missing)
      set(MOEFORGE_${id}_WHY "not found, and no GPU here to fetch it for (scripts/${script}, or -DMOEFORGE_${id}=ON)")
    endif()
  endif()
endmacro()
