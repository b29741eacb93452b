/* model_internal.h: what the files of common/model share and nobody else sees — the parsed
 * safetensors file and tensor table, and a few helpers. */
#ifndef PDS_MODEL_INTERNAL_H
#define PDS_MODEL_INTERNAL_H

#include "model/model.h"

#define PDS_ST_MAX_DIMS   8
#define PDS_ST_MAX_HEADER 100000000ull /* the safetensors format's own header limit */

/* One mmap'ed .safetensors file. The data section starts at map + 8 + header_len. */
typedef struct {
    char *path;
    void *map;           /* whole file, read-only; NULL if not mapped */
    size_t size;         /* file size in bytes */
    uint64_t header_len; /* JSON header bytes */
} pds_st_file_t;

/* One tensor entry of a header, validated against the file (sizes, bounds, no overlap). */
typedef struct {
    char *name;
    int st_dtype; /* index into the safetensors dtype table (pds_st_dtype_*) */
    int ndim;
    int64_t shape[PDS_ST_MAX_DIMS];
    int64_t numel;
    uint64_t begin, end; /* data_offsets, relative to the data section */
    int file;            /* index of the pds_st_file_t it lives in */
} pds_st_tensor_t;

/* Maps `path` into *f and appends its tensors to *tensors / *n (growing the pds_malloc'ed array;
 * entries get .file = file_index). On error nothing is appended and *f holds nothing to free;
 * every malformed case has its own PDS_ERR naming the file (and tensor). */
pds_status_t pds_st_file_open(const char *path, int file_index, pds_st_file_t *f,
                              pds_st_tensor_t **tensors, int *n);
void pds_st_file_close(pds_st_file_t *f); /* unmaps, frees path; accepts a zeroed struct */

/* Safetensors dtype table: name ("BF16"), element size, and whether we can use it. */
const char *pds_st_dtype_name(int st_dtype);
/* The pds_dtype_t for a table entry; false if it is a valid safetensors dtype we do not use. */
bool pds_st_dtype_to_pds(int st_dtype, pds_dtype_t *out);
/* Table index of a dtype name; -1 if unknown. */
int pds_st_dtype_find(const char *name);

/* Fresh pds_malloc'ed "dir/name". */
char *pds_model_path_join(const char *dir, const char *name);

#endif /* PDS_MODEL_INTERNAL_H */
