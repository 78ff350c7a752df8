# tests/gpu/gpu.mk: the GPU test and benchmark harness (tests/gpu/run.sh runs
# it on the GPU machine). Included by the Makefile after its own rules:
#   gpu_check, gpu_bench   drive the worker's backends directly (cuda or cpu),
#                          so they link libmmworker.a like cpu_bench; they
#                          build with CUDA=0 too and then say the build has no
#                          CUDA backend (gpu_check --backend cpu runs in CI);
#   gpu_bw, gpu_gemm       device memory bandwidth and cuBLAS bf16 peak, the
#                          yardsticks for the roofline; CUDA=1 only;
#   libktrace.so           a kernel timeline through CUPTI (run.sh profile);
#                          CUDA=1 only.
# Standalone: make -f Makefile -f tests/gpu/gpu.mk BUILD=... gpu-tests
#
# Its rules must not become the default goal wherever it is included.
GPU_SAVED_GOAL := $(.DEFAULT_GOAL)
GPU_HARNESS := tests/gpu/harness.c tests/gpu/harness.h
GPU_TEST_BIN := $(BUILD)/tests/gpu_check $(BUILD)/tests/gpu_bench
ifeq ($(CUDA),1)
GPU_TEST_BIN += $(BUILD)/tests/gpu_bw $(BUILD)/tests/gpu_gemm $(BUILD)/tests/libktrace.so
endif

.PHONY: gpu-tests
gpu-tests: $(GPU_TEST_BIN)
all: $(GPU_TEST_BIN)

# Explicit rules: they win over the tests/%.c pattern rules of the Makefile.
$(BUILD)/tests/gpu_check: tests/gpu/check.c $(GPU_HARNESS) $(BUILD)/libmmworker.a $(BUILD)/libmmcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/gpu $(LDFLAGS) -o $@ tests/gpu/check.c tests/gpu/harness.c $(BUILD)/libmmworker.a $(BUILD)/libmmcommon.a $(LIBS) $(WORKER_LIBS)
$(BUILD)/tests/gpu_bench: tests/gpu/bench.c $(GPU_HARNESS) $(BUILD)/libmmworker.a $(BUILD)/libmmcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/gpu $(LDFLAGS) -o $@ tests/gpu/bench.c tests/gpu/harness.c $(BUILD)/libmmworker.a $(BUILD)/libmmcommon.a $(LIBS) $(WORKER_LIBS)

# Plain CUDA programs: nvcc links cudart statically by default; cuBLAS is
# the toolkit's shared library, found through the rpath or ld.so.conf.
GPU_CU_LIBS := -L$(CUDA_HOME)/lib64 -Xlinker -rpath,$(CUDA_HOME)/lib64
$(BUILD)/tests/gpu_bw: tests/gpu/bw.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -o $@ $< $(GPU_CU_LIBS)
$(BUILD)/tests/gpu_gemm: tests/gpu/gemm.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -o $@ $< $(GPU_CU_LIBS) -lcublas

# The kernel timeline (run.sh profile): a library the CUDA driver loads
# (CUDA_INJECTION64_PATH), on the toolkit's CUPTI.
$(BUILD)/tests/libktrace.so: tests/gpu/ktrace.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -fPIC -shared -I$(CUDA_HOME)/include -o $@ $< -L$(CUDA_HOME)/lib64 \
		-Wl,-rpath,$(CUDA_HOME)/lib64 -lcupti -lstdc++

.DEFAULT_GOAL := $(GPU_SAVED_GOAL)
