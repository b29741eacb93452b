/* config: node configuration — INI files (through libinih) and `--section.key=value` command-line
 * overrides, both checked against a schema that the program declares once as a table of fields
 * pointing into its own config struct (offsetof). The same table gives defaults, ranges, help text
 * and a printer whose output loads back to the same values, so there is no second hand-written
 * parser to drift from it.
 *
 * Order of precedence is the caller's order of calls: pds_config_defaults, then
 * pds_config_load_file, then pds_config_apply_args (command line overrides files).
 *
 * Every loader is all-or-nothing: values are parsed into a copy of the struct (schema.obj_size
 * bytes) and copied back only when the whole input is valid, so an error leaves `obj` untouched.
 * Errors carry one detail (pds_err_detail()) that names the place:
 *     file:   "node.ini:12: [engine] max_batch: 0 is below the minimum 1"
 *     flags:  "--engine.max_batch: 'x' is not an integer"
 * Status: PDS_ERR_PARSE for text that is not INI or a value that does not parse as its type;
 * PDS_ERR_INVALID_ARG for unknown sections/keys/flags, values out of range, a key given twice in
 * one file, a flag without a value, and schema mistakes (reported as "schema: ..."); PDS_ERR_IO
 * when the file cannot be opened or the output cannot be written; PDS_ERR_NO_MEMORY.
 *
 * INI dialect (libinih defaults, which Debian's build keeps): `[section]`, `key = value`,
 * whole-line comments starting with ';' or '#', inline comments " ; ..." (so a value cannot contain
 * " ;"), surrounding whitespace stripped, no quoting, no continuation lines. A line may hold at
 * most PDS_CONFIG_MAX_LINE bytes (inih's fixed line buffer); longer non-comment lines are an error
 * rather than being silently split. Keys before any [section] belong to section "".
 *
 * Value syntax per type (min/max/default are written the same way):
 *   INT, INT64   decimal integer ("-12")              stored as int / int64_t
 *   DOUBLE       finite decimal or exponent ("0.5")   double
 *   BOOL         true/false, yes/no, on/off, 1/0 (any case)   bool
 *   STRING       any text without control characters; fits char[size] with its NUL
 *   ENUM         one of `choices` (exact match)        int: index into choices
 *   DURATION     number + ns|us|ms|s|m|h ("250ms", "1.5s"); bare "0" allowed
 *                                                      int64_t nanoseconds
 *   SIZE         number + optional B|KB|MB|GB|TB (powers of 1000) or KiB|MiB|GiB|TiB (of 1024);
 *                bare number = bytes ("64MiB")         int64_t bytes, >= 0
 *
 * Thread safety: no state at all; functions are reentrant given distinct objects. The schema is
 * read-only and usually a static const table.
 */
#ifndef PDS_CONFIG_H
#define PDS_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "base/base.h"

#define PDS_CONFIG_MAX_LINE 197 /* bytes per INI line, newline excluded */

typedef enum {
    PDS_CONFIG_INT,
    PDS_CONFIG_INT64,
    PDS_CONFIG_DOUBLE,
    PDS_CONFIG_BOOL,
    PDS_CONFIG_STRING,
    PDS_CONFIG_ENUM,
    PDS_CONFIG_DURATION,
    PDS_CONFIG_SIZE,
} pds_config_type_t;

typedef struct {
    const char *section; /* "" for top-level keys; letters, digits, '_', '-' */
    const char *key;
    pds_config_type_t type;
    size_t offset;         /* of the member in the caller's struct: use PDS_CONFIG_MEMBER */
    size_t size;           /* sizeof the member; must match the type (STRING: the char[] size) */
    const char *def;       /* default in value syntax; NULL = zero / "" / first choice */
    const char *min, *max; /* bounds in value syntax (inclusive) or NULL; numeric types only */
    const char *const *choices; /* ENUM: NULL-terminated list of names */
    const char *help;           /* one line */
} pds_config_field_t;

/* `.offset = offsetof(T, m), .size = sizeof(T.m)` for a designated initializer. */
#define PDS_CONFIG_MEMBER(T, m) .offset = offsetof(T, m), .size = sizeof(((T *)0)->m)

typedef struct {
    const pds_config_field_t *fields;
    int n_fields;
    size_t obj_size; /* sizeof the caller's struct */
} pds_config_schema_t;

/* Checks the schema itself: sizes matching types, bounds and defaults parsing and in range, enum
 * choices present, no (section, key) twice. Every function below runs this check first. */
pds_status_t pds_config_schema_check(const pds_config_schema_t *s);

/* Writes every field's default into obj (other bytes of obj are left as they are). */
pds_status_t pds_config_defaults(const pds_config_schema_t *s, void *obj);

/* Applies the keys present in the INI file at `path` over the current values of obj; keys not in
 * the file keep their values. All-or-nothing (see above). */
pds_status_t pds_config_load_file(const pds_config_schema_t *s, void *obj, const char *path);
/* The same for INI text in memory; `name` stands in for the file name in error details. */
pds_status_t pds_config_load_string(const pds_config_schema_t *s, void *obj, const char *text,
                                    const char *name);

/* Applies command-line overrides from argv[0..argc) (pass argc - 1, argv + 1 from main):
 * `--section.key=value`, `--section.key value`, and for BOOL fields a bare `--section.key` meaning
 * true (a BOOL takes a value only through '='). Top-level keys are `--key`. Every other argument
 * (positional ones, flags without a '.' that name no top-level key) is kept, in order, in
 * argv[0..*n_rest) for the caller; after a lone "--" everything is kept (the "--" itself is
 * dropped). A later override of the same key wins. All-or-nothing; *n_rest and argv are written
 * only on success. */
pds_status_t pds_config_apply_args(const pds_config_schema_t *s, void *obj, int argc, char **argv,
                                   int *n_rest);

/* Writes the effective configuration of obj as INI that pds_config_load_file reads back to the
 * same values: sections in schema order, each key preceded by its help as a comment. */
pds_status_t pds_config_print(const pds_config_schema_t *s, const void *obj, FILE *f);

/* Writes a usage listing: one entry per field with its flag, type, default, range or choices and
 * help. */
pds_status_t pds_config_help(const pds_config_schema_t *s, FILE *f);

#endif /* PDS_CONFIG_H */
