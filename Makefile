# modelmux build. Plain GNU make; objects under build/.
#   make                 build everything
#   make test            install deps, build, run every test (last line: N passed, N failed)
#   make SANITIZE=address,undefined test
#   make run             the demo: gateway in front of local demo backends
#   make bench           benchmarks (not tests), see docs/BENCHMARKS.md
#   make fuzz            libFuzzer build of the HTTP request parser
CC       ?= cc
CFLAGS   ?= -O2 -g
CFLAGS   += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter \
            -fno-strict-aliasing -pthread -Icommon -Igateway -Iworker
LDFLAGS  += -pthread
LIBS     := -levent -levent_pthreads -lcurl -ljansson -lhiredis -lm
WORKER_LIBS := -lpcre2-8 -lopenblas
BUILD    ?= build
# make test / run / bench build with one job per core (the CUDA kernels take
# a minute each to compile).
JOBS     ?= $(shell nproc 2>/dev/null || echo 2)

ifdef SANITIZE
CFLAGS   += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -fno-sanitize-recover=all
LDFLAGS  += -fsanitize=$(SANITIZE)
BUILD    := build/san
endif

# The CUDA backend is built whenever nvcc is found (CUDA=0 leaves it out);
# without it backend_nocuda.c answers --device cuda with a clear error.
NVCC     ?= $(or $(shell command -v nvcc 2>/dev/null),$(wildcard /usr/local/cuda/bin/nvcc))
CUDA     ?= $(if $(NVCC),1,0)
# sm_90a: H100/H200 (the GPU machine); compute_80 PTX lets the driver JIT
# for any other card from Ampere on.
NVCC_ARCH ?= -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_80,code=compute_80
NVCCFLAGS ?= -O3 -g -lineinfo
NVCCFLAGS += -std=c++17 $(NVCC_ARCH) -Xcompiler -Wall,-Wextra,-Werror,-fno-strict-aliasing \
             --Werror all-warnings -Iworker -Iworker/kernels

COMMON_SRC  := $(wildcard common/*.c)
GATEWAY_SRC := $(filter-out gateway/main.c,$(wildcard gateway/*.c))
WORKER_SRC  := $(filter-out worker/main.c worker/backend_cuda.c worker/backend_tp.c worker/nccl_dl.c \
                 worker/backend_nocuda.c,$(wildcard worker/*.c))
ifeq ($(CUDA),1)
CUDA_HOME   ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CU_SRC      := $(wildcard worker/kernels/*.cu)
WORKER_SRC  += worker/backend_cuda.c worker/backend_tp.c worker/nccl_dl.c
CU_OBJ      := $(CU_SRC:%.cu=$(BUILD)/%.o)
# cudart is linked statically (no libcudart.so to find at run time); cuBLAS
# is a shared library of the toolkit, found through the rpath or ld.so.conf.
WORKER_LIBS_CUDA := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublas -lcublasLt \
                    -lcudart_static -ldl -lrt -lstdc++
# NCCL is not linked: nccl_dl.c loads it at run time for tensor parallelism.
$(BUILD)/worker/backend_cuda.o $(BUILD)/worker/backend_tp.o: CFLAGS += -I$(CUDA_HOME)/include
$(BUILD)/worker/nccl_dl.o: CFLAGS += -I$(CUDA_HOME)/include -DMM_CUDA_LIB64='"$(CUDA_HOME)/lib64"'
else
WORKER_SRC  += worker/backend_nocuda.c
endif
UNIT_SRC    := $(wildcard tests/unit/test_*.c)
FAKE_SRC    := $(wildcard tests/fakes/*.c)
BENCH_SRC   := $(wildcard tests/bench/*.c)

COMMON_OBJ  := $(COMMON_SRC:%.c=$(BUILD)/%.o)
GATEWAY_OBJ := $(GATEWAY_SRC:%.c=$(BUILD)/%.o)
WORKER_OBJ  := $(WORKER_SRC:%.c=$(BUILD)/%.o) $(CU_OBJ)
WORKER_LIBS += $(WORKER_LIBS_CUDA)
UNIT_BIN    := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/%)
FAKE_BIN    := $(FAKE_SRC:tests/fakes/%.c=$(BUILD)/tests/%)
BENCH_BIN   := $(BENCH_SRC:tests/bench/%.c=$(BUILD)/tests/%)
# The dashboard page, generated into C at build time (rules below): part of
# libmmgateway.a, so the gateway and the unit tests link it like any object.
DASHBOARD_C := $(BUILD)/gen/dashboard_html.c
GATEWAY_OBJ += $(DASHBOARD_C:.c=.o)

.PHONY: all deps test unit integration run bench fuzz clean
WORKER_BIN  := $(if $(wildcard worker/main.c),$(BUILD)/modelmux-worker)
all: $(BUILD)/modelmux-gateway $(WORKER_BIN) $(UNIT_BIN) $(FAKE_BIN) $(BENCH_BIN)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

# CUDA kernels; host-side code stays in C (backend_cuda.c), these export
# extern "C" launchers declared in worker/kernels/kernels.h.
$(BUILD)/worker/kernels/%.o: worker/kernels/%.cu worker/kernels/kernels.h
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

$(DASHBOARD_C): gateway/dashboard.html tools/embed.sh
	@mkdir -p $(dir $@)
	sh tools/embed.sh mm_dashboard_html gateway/dashboard.html dashboard.h >$@.tmp
	@mv $@.tmp $@
$(DASHBOARD_C:.c=.o): $(DASHBOARD_C) gateway/dashboard.h
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libmmcommon.a: $(COMMON_OBJ)
	@rm -f $@
	$(AR) rcs $@ $^
$(BUILD)/libmmgateway.a: $(GATEWAY_OBJ)
	@rm -f $@
	$(AR) rcs $@ $^
$(BUILD)/libmmworker.a: $(WORKER_OBJ)
	@mkdir -p $(dir $@)
	@rm -f $@
	$(AR) rcs $@ $^

$(BUILD)/modelmux-gateway: $(BUILD)/gateway/main.o $(BUILD)/libmmgateway.a $(BUILD)/libmmcommon.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/modelmux-worker: $(BUILD)/worker/main.o $(BUILD)/libmmworker.a $(BUILD)/libmmcommon.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS) $(WORKER_LIBS)

$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libmmgateway.a $(BUILD)/libmmworker.a $(BUILD)/libmmcommon.a tests/unit/test.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/unit $(LDFLAGS) -o $@ $< $(BUILD)/libmmgateway.a $(BUILD)/libmmworker.a $(BUILD)/libmmcommon.a $(LIBS) $(WORKER_LIBS)
$(BUILD)/tests/%: tests/fakes/%.c $(BUILD)/libmmcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libmmcommon.a $(LIBS)
$(BUILD)/tests/%: tests/bench/%.c $(BUILD)/libmmcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libmmcommon.a $(LIBS)
# cpu_bench drives the CPU backend directly, so it alone needs the worker's
# library (this explicit rule wins over the pattern above).
$(BUILD)/tests/cpu_bench: tests/bench/cpu_bench.c $(BUILD)/libmmworker.a $(BUILD)/libmmcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libmmworker.a $(BUILD)/libmmcommon.a $(LIBS) $(WORKER_LIBS)

deps:
	@sh deploy/deps.sh

test: deps
	@$(MAKE) --no-print-directory -j$(JOBS) all
	@BUILD=$(BUILD) sh tests/run.sh

unit: all
	@BUILD=$(BUILD) sh tests/run.sh unit

integration: all
	@BUILD=$(BUILD) sh tests/run.sh integration

run: deps
	@$(MAKE) --no-print-directory -j$(JOBS) all
	@sh deploy/demo.sh

bench: deps
	@$(MAKE) --no-print-directory -j$(JOBS) all
	@sh tests/bench/run.sh

# The worker's CPU speed next to the memory roofline (docs/BENCHMARKS.md).
.PHONY: bench-worker
bench-worker: deps
	@$(MAKE) --no-print-directory -j$(JOBS) all
	@BUILD=$(BUILD) sh tests/bench/worker.sh

# libFuzzer target for the strict request parser; corpus in tests/fuzz/corpus.
FUZZ_SECONDS ?= 30
fuzz: $(BUILD)/fuzz/fuzz_http
	$(BUILD)/fuzz/fuzz_http -max_total_time=$(FUZZ_SECONDS) -max_len=4096 $(BUILD)/fuzz/corpus tests/fuzz/corpus/http_request
$(BUILD)/fuzz/fuzz_http: tests/fuzz/fuzz_http.c $(COMMON_SRC)
	@mkdir -p $(dir $@) $(BUILD)/fuzz/corpus
	clang -std=c11 -D_GNU_SOURCE -g -O1 -Icommon -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -o $@ tests/fuzz/fuzz_http.c common/http_parse.c common/buf.c

include tests/gpu/gpu.mk

clean:
	rm -rf build

-include $(COMMON_OBJ:.o=.d) $(GATEWAY_OBJ:.o=.d) $(WORKER_OBJ:.o=.d) $(BUILD)/gateway/main.d $(BUILD)/worker/main.d
