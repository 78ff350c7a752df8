/* safetensors.h: memory-mapped .safetensors files and sharded sets.
 *
 * A file is an 8-byte little-endian header length, a JSON header mapping
 * tensor names to {dtype, shape, data_offsets}, then the raw data. Opening
 * validates every entry (known dtype, shape product times element size equal
 * to the byte range, range inside the file, no two ranges overlapping), so a
 * caller that found a tensor can read all of its bytes without further
 * checks. Errors name the file and, where there is one, the tensor. */
#ifndef MM_SAFETENSORS_H
#define MM_SAFETENSORS_H
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* The header is JSON we must parse in full before anything else; real
 * checkpoints stay far below this. */
#define MM_ST_HEADER_MAX (100u * 1024 * 1024)
#define MM_ST_MAX_DIMS 8

typedef enum mm_dtype {
    MM_DT_BOOL, MM_DT_U8, MM_DT_I8, MM_DT_I16, MM_DT_U16, MM_DT_F16, MM_DT_BF16,
    MM_DT_I32, MM_DT_U32, MM_DT_F32, MM_DT_I64, MM_DT_U64, MM_DT_F64,
    MM_DT_F8_E4M3, MM_DT_F8_E5M2,
    MM_DT_COUNT
} mm_dtype;

/* Name as safetensors spells it ("BF16"), and element size in bytes. */
const char *mm_dtype_name(mm_dtype dt);
size_t      mm_dtype_size(mm_dtype dt);
/* -1 when the name is not a safetensors dtype. */
int         mm_dtype_parse(const char *name);

typedef struct mm_st_tensor {
    const char *name;
    const char *file;        /* path of the file holding it (for messages) */
    mm_dtype    dtype;
    int         ndim;
    int64_t     shape[MM_ST_MAX_DIMS];
    int64_t     numel;
    const void *data;        /* inside the mapping; valid until close */
    size_t      nbytes;
} mm_st_tensor;

typedef struct mm_st_file mm_st_file;

int  mm_st_open(const char *path, mm_st_file **out, char *err, size_t errlen);
void mm_st_close(mm_st_file *f);
const char *mm_st_file_path(const mm_st_file *f);
size_t mm_st_file_count(const mm_st_file *f);
const mm_st_tensor *mm_st_file_tensor(const mm_st_file *f, size_t i);
const mm_st_tensor *mm_st_file_find(const mm_st_file *f, const char *name);

/* A model's weights: model.safetensors, or the shards that
 * model.safetensors.index.json's weight_map names (each opened once; every
 * name in the map must be found in the shard the map says). */
typedef struct mm_st_set mm_st_set;

int  mm_st_set_open(const char *dir, mm_st_set **out, char *err, size_t errlen);
void mm_st_set_close(mm_st_set *s);
const mm_st_tensor *mm_st_set_find(const mm_st_set *s, const char *name);
/* Where a missing tensor would have been looked for: "DIR/model.safetensors"
 * or "DIR/model.safetensors.index.json". */
const char *mm_st_set_origin(const mm_st_set *s);
size_t mm_st_set_files(const mm_st_set *s);
const mm_st_file *mm_st_set_file(const mm_st_set *s, size_t i);

/* Writing, for generators and tests: describe every tensor in order, write
 * the header, then append each tensor's bytes in the same order. */
typedef struct mm_st_desc {
    const char *name;
    mm_dtype    dtype;
    int         ndim;
    int64_t     shape[MM_ST_MAX_DIMS];
} mm_st_desc;

int mm_st_write_header(FILE *fp, const mm_st_desc *d, size_t n, char *err, size_t errlen);
#endif
