/* A compile-only stand-in for the CUDA driver (libcuda.so.1), for experiments/sass_relation_kl.py.

   Mosaic GPU compiles a kernel (MLIR -> PTX -> ptxas -> cubin) inside the CUDA plugin's
   MosaicGpuCompile, which first asks the driver for the current device's compute capability and,
   after compiling (and dumping PTX, ptxas's report and SASS when asked to), loads the cubin onto
   the device. On a machine without a GPU this library answers the first question with one
   compute capability 9.0 device and fails everything else: the compile and its dumps happen, the
   load fails, and nothing ever runs. cuInit fails, so no client ever believes a GPU is present.

   Built at run time by `cc -shared -fPIC` into a temporary directory that is put first on the
   child process's LD_LIBRARY_PATH. */

typedef int CUresult;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_NO_DEVICE 100
#define CUDA_ERROR_NOT_SUPPORTED 801
#define ATTR_COMPUTE_CAPABILITY_MAJOR 75
#define ATTR_COMPUTE_CAPABILITY_MINOR 76

CUresult cuInit(unsigned int flags) {
  (void)flags;
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuCtxGetDevice(int *device) {
  *device = 0;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
  (void)device;
  if (attribute == ATTR_COMPUTE_CAPABILITY_MAJOR) {
    *value = 9;
    return CUDA_SUCCESS;
  }
  if (attribute == ATTR_COMPUTE_CAPABILITY_MINOR) {
    *value = 0;
    return CUDA_SUCCESS;
  }
  *value = 0;
  return CUDA_ERROR_NOT_SUPPORTED;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
  (void)error;
  *text = "compile-only stand-in driver (experiments/gpu/fake_libcuda.c): there is no GPU";
  return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult error, const char **text) {
  (void)error;
  *text = "CUDA_ERROR_NO_DEVICE";
  return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int *version) {
  *version = 13000;
  return CUDA_SUCCESS;
}
