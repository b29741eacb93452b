/* config.c: schema-driven INI + command-line configuration.
 *
 * One value parser (parse_text) serves the file loader, the flag parser, defaults and bounds, and
 * one formatter (format_value) serves print and help, so every path accepts and writes the same
 * syntax and print -> load round-trips. Loads go into a copy of the caller's struct that replaces
 * it only on success (all-or-nothing at the price of one obj_size allocation per load).
 *
 * libinih reports no line numbers to its handler in Debian's build, so the file is fed through our
 * own reader (ini_parse_stream): it counts lines, so the handler knows the line it is called for;
 * strips leading blanks, which keeps inih's continuation-line rule from gluing an indented line
 * onto the previous value; and stops the parse at the first error. inih's runtime option globals
 * are left alone (this module has no state of its own either).
 */
#include "config/config.h"

#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t i; /* INT, INT64, DURATION (ns), SIZE (bytes) */
    double d;  /* DOUBLE */
    bool b;    /* BOOL */
    int e;     /* ENUM index */
} val_t;

#define WHY_CAP 192

static const char *type_name(pds_config_type_t t)
{
    switch (t) {
    case PDS_CONFIG_INT:
        return "int";
    case PDS_CONFIG_INT64:
        return "int64";
    case PDS_CONFIG_DOUBLE:
        return "double";
    case PDS_CONFIG_BOOL:
        return "bool";
    case PDS_CONFIG_STRING:
        return "string";
    case PDS_CONFIG_ENUM:
        return "enum";
    case PDS_CONFIG_DURATION:
        return "duration";
    case PDS_CONFIG_SIZE:
        return "size";
    }
    return "?";
}

static bool is_numeric(pds_config_type_t t)
{
    return t == PDS_CONFIG_INT || t == PDS_CONFIG_INT64 || t == PDS_CONFIG_DOUBLE ||
           t == PDS_CONFIG_DURATION || t == PDS_CONFIG_SIZE;
}

/* "[engine] max_batch", or "port" for a top-level key. */
static void field_label(const pds_config_field_t *f, char *buf, size_t cap)
{
    if (f->section[0])
        snprintf(buf, cap, "[%s] %s", f->section, f->key);
    else
        snprintf(buf, cap, "%s", f->key);
}

/* "engine.max_batch", or "port". */
static void flag_name(const pds_config_field_t *f, char *buf, size_t cap)
{
    if (f->section[0])
        snprintf(buf, cap, "%s.%s", f->section, f->key);
    else
        snprintf(buf, cap, "%s", f->key);
}

/* ---- parsing values ---------------------------------------------------------------------------
 */
static void trim_span(const char *t, const char **b, const char **e)
{
    const char *s = t, *z = t + strlen(t);
    while (s < z && isspace((unsigned char)*s)) s++;
    while (z > s && isspace((unsigned char)z[-1])) z--;
    *b = s;
    *e = z;
}

/* Copies the trimmed text into buf (NUL-terminated); false if it does not fit. */
static bool trimmed_copy(const char *t, char *buf, size_t cap)
{
    const char *b, *e;
    trim_span(t, &b, &e);
    if ((size_t)(e - b) >= cap) return false;
    memcpy(buf, b, (size_t)(e - b));
    buf[e - b] = '\0';
    return true;
}

static bool parse_i64(const char *t, int64_t *out)
{
    if (!*t) return false;
    for (const char *c = (*t == '-' || *t == '+') ? t + 1 : t; *c; c++)
        if (!isdigit((unsigned char)*c)) return false;
    if (!isdigit((unsigned char)t[*t == '-' || *t == '+'])) return false;
    errno = 0;
    char *end;
    long long v = strtoll(t, &end, 10);
    if (errno == ERANGE || *end) return false;
    *out = v;
    return true;
}

/* "1.5ms" -> number part (exactly as an integer when it is one) and unit suffix. Only plain
 * decimal notation: no hex, inf or nan. */
static bool split_number(const char *t, char *num, size_t cap, const char **unit)
{
    const char *c = t;
    if (*c == '-' || *c == '+') c++;
    bool digits = false;
    while (isdigit((unsigned char)*c) || *c == '.' || ((*c == 'e' || *c == 'E') && digits)) {
        if (*c == 'e' || *c == 'E') {
            if (c[1] == '-' || c[1] == '+') c++;
        } else if (isdigit((unsigned char)*c)) {
            digits = true;
        }
        c++;
    }
    if (!digits || (size_t)(c - t) >= cap) return false;
    memcpy(num, t, (size_t)(c - t));
    num[c - t] = '\0';
    while (*c == ' ') c++;
    *unit = c;
    return true;
}

/* num * mult into an int64, exactly for integers, rounded otherwise; false on overflow/garbage. */
static bool scale(const char *num, int64_t mult, int64_t *out)
{
    int64_t iv;
    if (parse_i64(num, &iv)) return !__builtin_mul_overflow(iv, mult, out);
    char *end;
    double d = strtod(num, &end);
    if (*end || !isfinite(d)) return false;
    double x = d * (double)mult;
    if (!(fabs(x) < 9.2e18)) return false;
    *out = llround(x);
    return true;
}

static pds_status_t parse_text(const pds_config_field_t *f, const char *text, val_t *v, char *why)
{
    char t[96];
    if (f->type == PDS_CONFIG_STRING) {
        const char *b, *e;
        trim_span(text, &b, &e);
        for (const char *c = b; c < e; c++) {
            if (iscntrl((unsigned char)*c)) {
                snprintf(why, WHY_CAP, "control character 0x%02x in value", (unsigned char)*c);
                return PDS_ERR_PARSE;
            }
            if (*c == ';' && c > b && isspace((unsigned char)c[-1])) {
                snprintf(why, WHY_CAP, "value contains ' ;', which INI reads as a comment");
                return PDS_ERR_PARSE;
            }
        }
        if ((size_t)(e - b) >= f->size) {
            snprintf(why, WHY_CAP, "value of %zu bytes does not fit (at most %zu)", (size_t)(e - b),
                     f->size - 1);
            return PDS_ERR_INVALID_ARG;
        }
        return PDS_OK;
    }
    if (!trimmed_copy(text, t, sizeof(t))) {
        snprintf(why, WHY_CAP, "value '%.40s...' is too long for a %s", text, type_name(f->type));
        return PDS_ERR_PARSE;
    }
    char num[64];
    const char *unit;
    switch (f->type) {
    case PDS_CONFIG_INT:
    case PDS_CONFIG_INT64:
        if (!parse_i64(t, &v->i)) {
            const char *d = t + (t[0] == '-' || t[0] == '+');
            bool digits = *d && strspn(d, "0123456789") == strlen(d);
            snprintf(why, WHY_CAP, digits ? "'%s' does not fit in int64" : "'%s' is not an integer",
                     t);
            return PDS_ERR_PARSE;
        }
        if (f->type == PDS_CONFIG_INT && (v->i < INT32_MIN || v->i > INT32_MAX)) {
            snprintf(why, WHY_CAP, "'%s' does not fit in int", t);
            return PDS_ERR_PARSE;
        }
        return PDS_OK;
    case PDS_CONFIG_DOUBLE: {
        char *end;
        if (!split_number(t, num, sizeof(num), &unit) || *unit) {
            snprintf(why, WHY_CAP, "'%s' is not a number", t);
            return PDS_ERR_PARSE;
        }
        v->d = strtod(num, &end);
        if (!isfinite(v->d)) {
            snprintf(why, WHY_CAP, "'%s' is not a finite number", t);
            return PDS_ERR_PARSE;
        }
        return PDS_OK;
    }
    case PDS_CONFIG_BOOL: {
        static const char *yes[] = {"true", "yes", "on", "1"}, *no[] = {"false", "no", "off", "0"};
        for (int i = 0; i < 4; i++) {
            if (!strcasecmp(t, yes[i]) || !strcasecmp(t, no[i])) {
                v->b = !strcasecmp(t, yes[i]);
                return PDS_OK;
            }
        }
        snprintf(why, WHY_CAP, "'%s' is not a boolean (true/false, yes/no, on/off, 1/0)", t);
        return PDS_ERR_PARSE;
    }
    case PDS_CONFIG_ENUM: {
        for (int i = 0; f->choices[i]; i++) {
            if (!strcmp(t, f->choices[i])) {
                v->e = i;
                return PDS_OK;
            }
        }
        int n = snprintf(why, WHY_CAP, "'%.40s' is not one of ", t);
        for (int i = 0; f->choices[i] && n < WHY_CAP; i++)
            n += snprintf(why + n, WHY_CAP - n, "%s%s", i ? "|" : "", f->choices[i]);
        return PDS_ERR_PARSE;
    }
    case PDS_CONFIG_DURATION: {
        static const struct {
            const char *u;
            int64_t ns;
        } units[] = {{"ns", 1},           {"us", 1000},         {"ms", 1000000},
                     {"s", 1000000000LL}, {"m", 60000000000LL}, {"h", 3600000000000LL}};
        if (split_number(t, num, sizeof(num), &unit)) {
            if (!*unit && strtod(num, NULL) == 0) {
                v->i = 0;
                return PDS_OK;
            }
            for (size_t i = 0; i < PDS_ARRAY_LEN(units); i++) {
                if (strcmp(unit, units[i].u)) continue;
                if (scale(num, units[i].ns, &v->i)) return PDS_OK;
                snprintf(why, WHY_CAP, "'%s' is too large a duration", t);
                return PDS_ERR_PARSE;
            }
        }
        snprintf(why, WHY_CAP, "'%s' is not a duration (number + ns|us|ms|s|m|h, e.g. 250ms)", t);
        return PDS_ERR_PARSE;
    }
    case PDS_CONFIG_SIZE: {
        static const struct {
            const char *u;
            int64_t b;
        } units[] = {{"", 1},
                     {"B", 1},
                     {"KB", 1000},
                     {"MB", 1000000},
                     {"GB", 1000000000LL},
                     {"TB", 1000000000000LL},
                     {"KiB", 1LL << 10},
                     {"MiB", 1LL << 20},
                     {"GiB", 1LL << 30},
                     {"TiB", 1LL << 40}};
        if (split_number(t, num, sizeof(num), &unit)) {
            if (num[0] == '-' && strtod(num, NULL) != 0) {
                snprintf(why, WHY_CAP, "'%s' is a negative size", t);
                return PDS_ERR_PARSE;
            }
            for (size_t i = 0; i < PDS_ARRAY_LEN(units); i++) {
                if (strcmp(unit, units[i].u)) continue;
                if (scale(num, units[i].b, &v->i)) return PDS_OK;
                snprintf(why, WHY_CAP, "'%s' is too large a size", t);
                return PDS_ERR_PARSE;
            }
        }
        snprintf(why, WHY_CAP,
                 "'%s' is not a size (number + B|KB|MB|GB|TB|KiB|MiB|GiB|TiB, e.g. 64MiB)", t);
        return PDS_ERR_PARSE;
    }
    case PDS_CONFIG_STRING:
        break; /* handled above */
    }
    snprintf(why, WHY_CAP, "unknown type %d", (int)f->type);
    return PDS_ERR_INVALID_ARG;
}

/* -1, 0, 1 as a <, ==, > b for numeric types. */
static int val_cmp(pds_config_type_t t, const val_t *a, const val_t *b)
{
    if (t == PDS_CONFIG_DOUBLE) return (a->d > b->d) - (a->d < b->d);
    return (a->i > b->i) - (a->i < b->i);
}

/* Bounds are checked by schema_check before any use, so parsing them here cannot fail. */
static pds_status_t check_range(const pds_config_field_t *f, const char *text, const val_t *v,
                                char *why)
{
    char scratch[WHY_CAP];
    val_t bound;
    const char *b, *e;
    trim_span(text, &b, &e);
    if (f->min && parse_text(f, f->min, &bound, scratch) == PDS_OK &&
        val_cmp(f->type, v, &bound) < 0) {
        snprintf(why, WHY_CAP, "%.*s is below the minimum %s", (int)PDS_MIN(e - b, 64), b, f->min);
        return PDS_ERR_INVALID_ARG;
    }
    if (f->max && parse_text(f, f->max, &bound, scratch) == PDS_OK &&
        val_cmp(f->type, v, &bound) > 0) {
        snprintf(why, WHY_CAP, "%.*s is above the maximum %s", (int)PDS_MIN(e - b, 64), b, f->max);
        return PDS_ERR_INVALID_ARG;
    }
    return PDS_OK;
}

/* Parses text, checks the range and stores the value into obj. */
static pds_status_t set_field(const pds_config_field_t *f, void *obj, const char *text, char *why)
{
    val_t v = {0};
    pds_status_t s = parse_text(f, text, &v, why);
    if (s == PDS_OK && is_numeric(f->type)) s = check_range(f, text, &v, why);
    if (s != PDS_OK) return s;
    char *dst = (char *)obj + f->offset;
    switch (f->type) {
    case PDS_CONFIG_INT:
    case PDS_CONFIG_ENUM: {
        int x = f->type == PDS_CONFIG_INT ? (int)v.i : v.e;
        memcpy(dst, &x, sizeof(x));
        break;
    }
    case PDS_CONFIG_INT64:
    case PDS_CONFIG_DURATION:
    case PDS_CONFIG_SIZE:
        memcpy(dst, &v.i, sizeof(v.i));
        break;
    case PDS_CONFIG_DOUBLE:
        memcpy(dst, &v.d, sizeof(v.d));
        break;
    case PDS_CONFIG_BOOL:
        memcpy(dst, &v.b, sizeof(v.b));
        break;
    case PDS_CONFIG_STRING: {
        const char *b, *e;
        trim_span(text, &b, &e);
        memcpy(dst, b, (size_t)(e - b));
        dst[e - b] = '\0';
        break;
    }
    }
    return PDS_OK;
}

/* ---- formatting values ------------------------------------------------------------------------
 */
static void format_i64_unit(int64_t v, const char *const *names, const int64_t *mults, int n,
                            char *buf, size_t cap)
{
    for (int i = 0; i < n; i++) {
        if (v != 0 && v % mults[i] == 0) {
            snprintf(buf, cap, "%lld%s", (long long)(v / mults[i]), names[i]);
            return;
        }
    }
    snprintf(buf, cap, "%lld", (long long)v); /* only 0 or plain bytes get here */
}

/* Shortest %g that reads back as the same double. */
static void format_double(double d, char *buf, size_t cap)
{
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, cap, "%.*g", prec, d);
        if (strtod(buf, NULL) == d) return;
    }
}

static pds_status_t format_value(const pds_config_field_t *f, const void *obj, char *buf,
                                 size_t cap)
{
    const char *src = (const char *)obj + f->offset;
    int x;
    int64_t i;
    double d;
    bool b;
    switch (f->type) {
    case PDS_CONFIG_INT:
        memcpy(&x, src, sizeof(x)), snprintf(buf, cap, "%d", x);
        break;
    case PDS_CONFIG_INT64:
        memcpy(&i, src, sizeof(i)), snprintf(buf, cap, "%lld", (long long)i);
        break;
    case PDS_CONFIG_DOUBLE:
        memcpy(&d, src, sizeof(d)), format_double(d, buf, cap);
        break;
    case PDS_CONFIG_BOOL:
        memcpy(&b, src, sizeof(b)), snprintf(buf, cap, b ? "true" : "false");
        break;
    case PDS_CONFIG_STRING:
        snprintf(buf, cap, "%.*s", (int)strnlen(src, f->size), src);
        break;
    case PDS_CONFIG_ENUM: {
        memcpy(&x, src, sizeof(x));
        int n = 0;
        while (f->choices[n]) n++;
        if (x < 0 || x >= n) {
            char label[128];
            field_label(f, label, sizeof(label));
            return PDS_ERR(PDS_ERR_INVALID_ARG, "%s: enum index %d outside its %d choices", label,
                           x, n);
        }
        snprintf(buf, cap, "%s", f->choices[x]);
        break;
    }
    case PDS_CONFIG_DURATION: {
        static const char *const names[] = {"h", "m", "s", "ms", "us", "ns"};
        static const int64_t mults[] = {3600000000000LL, 60000000000LL, 1000000000LL,
                                        1000000,         1000,          1};
        memcpy(&i, src, sizeof(i));
        format_i64_unit(i, names, mults, 6, buf, cap);
        break;
    }
    case PDS_CONFIG_SIZE: {
        static const char *const names[] = {"TiB", "GiB", "MiB", "KiB"};
        static const int64_t mults[] = {1LL << 40, 1LL << 30, 1LL << 20, 1LL << 10};
        memcpy(&i, src, sizeof(i));
        format_i64_unit(i, names, mults, 4, buf, cap);
        break;
    }
    }
    return PDS_OK;
}

/* ---- schema -----------------------------------------------------------------------------------
 */
static bool valid_name(const char *s, bool allow_empty)
{
    if (!*s) return allow_empty;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '_' && *s != '-') return false;
    return true;
}

static size_t storage_size(pds_config_type_t t)
{
    switch (t) {
    case PDS_CONFIG_INT:
    case PDS_CONFIG_ENUM:
        return sizeof(int);
    case PDS_CONFIG_INT64:
    case PDS_CONFIG_DURATION:
    case PDS_CONFIG_SIZE:
        return sizeof(int64_t);
    case PDS_CONFIG_DOUBLE:
        return sizeof(double);
    case PDS_CONFIG_BOOL:
        return sizeof(bool);
    case PDS_CONFIG_STRING:
        return 0;
    }
    return 0;
}

/* The default as value text: def, or the type's zero value. */
static const char *default_text(const pds_config_field_t *f)
{
    if (f->def) return f->def;
    if (f->type == PDS_CONFIG_ENUM) return f->choices[0];
    if (f->type == PDS_CONFIG_BOOL) return "false";
    return f->type == PDS_CONFIG_STRING ? "" : "0";
}

/* Writes the reason into why and evaluates to PDS_ERR_INVALID_ARG. */
#define BAD(...) (snprintf(why, WHY_CAP, __VA_ARGS__), PDS_ERR_INVALID_ARG)

static pds_status_t check_field(const pds_config_schema_t *s, const pds_config_field_t *f,
                                char *why)
{
    if (!f->section || !f->key || !valid_name(f->section, true) || !valid_name(f->key, false))
        return BAD("section and key must be [A-Za-z0-9_-]+");
    if ((unsigned)f->type > PDS_CONFIG_SIZE) return BAD("unknown type %d", (int)f->type);
    size_t want = storage_size(f->type);
    if (f->size == 0 || (want && f->size != want))
        return BAD("member size %zu does not hold a %s (use PDS_CONFIG_MEMBER)", f->size,
                   type_name(f->type));
    if (f->offset > s->obj_size || f->size > s->obj_size - f->offset)
        return BAD("member at %zu+%zu outside obj_size %zu", f->offset, f->size, s->obj_size);
    if (f->type == PDS_CONFIG_ENUM && (!f->choices || !f->choices[0]))
        return BAD("enum without choices");
    if (!is_numeric(f->type) && (f->min || f->max))
        return BAD("min/max on a %s", type_name(f->type));
    char inner[WHY_CAP];
    val_t lo, hi, v;
    if (f->min && parse_text(f, f->min, &lo, inner) != PDS_OK) return BAD("min: %.150s", inner);
    if (f->max && parse_text(f, f->max, &hi, inner) != PDS_OK) return BAD("max: %.150s", inner);
    if (f->min && f->max && val_cmp(f->type, &lo, &hi) > 0)
        return BAD("min %s > max %s", f->min, f->max);
    const char *def = default_text(f);
    if (parse_text(f, def, &v, inner) != PDS_OK ||
        (is_numeric(f->type) && check_range(f, def, &v, inner) != PDS_OK))
        return BAD("default: %.150s", inner);
    for (const pds_config_field_t *g = s->fields; g < f; g++)
        if (!strcmp(g->section, f->section) && !strcmp(g->key, f->key))
            return BAD("declared twice");
    return PDS_OK;
}
#undef BAD

pds_status_t pds_config_schema_check(const pds_config_schema_t *s)
{
    if (!s || s->n_fields < 0 || (s->n_fields > 0 && !s->fields) || s->obj_size == 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "schema: NULL, no fields array or obj_size 0");
    for (int i = 0; i < s->n_fields; i++) {
        char why[WHY_CAP], label[160];
        const pds_config_field_t *f = &s->fields[i];
        if (check_field(s, f, why) != PDS_OK) {
            if (f->section && f->key)
                field_label(f, label, sizeof(label));
            else
                snprintf(label, sizeof(label), "field %d", i);
            return PDS_ERR(PDS_ERR_INVALID_ARG, "schema: %s: %s", label, why);
        }
    }
    return PDS_OK;
}

pds_status_t pds_config_defaults(const pds_config_schema_t *s, void *obj)
{
    PDS_TRY(pds_config_schema_check(s));
    if (!obj) return PDS_ERR(PDS_ERR_INVALID_ARG, "config defaults: obj is NULL");
    char why[WHY_CAP];
    for (int i = 0; i < s->n_fields; i++)
        PDS_ASSERT(set_field(&s->fields[i], obj, default_text(&s->fields[i]), why) == PDS_OK);
    return PDS_OK;
}

static int find_field(const pds_config_schema_t *s, const char *section, size_t section_len,
                      const char *key, size_t key_len)
{
    for (int i = 0; i < s->n_fields; i++) {
        const pds_config_field_t *f = &s->fields[i];
        if (strlen(f->section) == section_len && !strncmp(f->section, section, section_len) &&
            strlen(f->key) == key_len && !strncmp(f->key, key, key_len))
            return i;
    }
    return -1;
}

static bool section_known(const pds_config_schema_t *s, const char *section, size_t len)
{
    for (int i = 0; i < s->n_fields; i++)
        if (strlen(s->fields[i].section) == len && !strncmp(s->fields[i].section, section, len))
            return true;
    return false;
}

/* ---- INI loading ------------------------------------------------------------------------------
 */
typedef struct {
    const pds_config_schema_t *schema;
    void *tmp;      /* (obj_size) the copy being filled */
    int *seen_line; /* (n_fields) line that set each field, 0 = not yet */
    const char *name;
    FILE *file;      /* source: a file ... */
    const char *str; /* ... or a string (advanced as read) */
    int lineno;
    int err_line; /* 0 = no error yet */
} load_ctx_t;

static int next_char(load_ctx_t *c)
{
    if (c->file) return fgetc(c->file);
    if (!*c->str) return EOF;
    return (unsigned char)*c->str++;
}

/* fgets-like: one line with leading blanks removed. Returns NULL at EOF or once an error is set. */
static char *read_line(char *buf, int num, void *stream)
{
    load_ctx_t *c = stream;
    if (c->err_line) return NULL;
    int ch = next_char(c);
    if (ch == EOF) return NULL;
    c->lineno++;
    while (ch == ' ' || ch == '\t') ch = next_char(c);
    int n = 0, limit = num - 3; /* inih wants room for '\r', '\n' and NUL */
    bool comment = ch == ';' || ch == '#', too_long = false;
    for (; ch != EOF && ch != '\n'; ch = next_char(c)) {
        if (ch == '\0') {
            c->err_line = c->lineno;
            PDS_ERR(PDS_ERR_PARSE, "%s:%d: NUL byte in line", c->name, c->lineno);
            return NULL;
        }
        if (n < limit)
            buf[n++] = (char)ch;
        else
            too_long = true;
    }
    if (too_long && !comment) {
        c->err_line = c->lineno;
        PDS_ERR(PDS_ERR_PARSE, "%s:%d: line longer than %d bytes", c->name, c->lineno, limit);
        return NULL;
    }
    if (ch == '\n') buf[n++] = '\n';
    buf[n] = '\0';
    return buf;
}

static int on_pair(void *user, const char *section, const char *key, const char *value)
{
    load_ctx_t *c = user;
    if (c->err_line) return 0;
    const pds_config_schema_t *s = c->schema;
    int idx = find_field(s, section, strlen(section), key, strlen(key));
    const char *where = section[0] ? "[" : "";
    const char *where_end = section[0] ? "] " : "";
    if (idx < 0) {
        c->err_line = c->lineno;
        PDS_ERR(PDS_ERR_INVALID_ARG, "%s:%d: %s%s%s%s: %s", c->name, c->lineno, where, section,
                where_end, key,
                section_known(s, section, strlen(section)) ? "unknown key" : "unknown section");
        return 0;
    }
    if (c->seen_line[idx]) {
        c->err_line = c->lineno;
        PDS_ERR(PDS_ERR_INVALID_ARG, "%s:%d: %s%s%s%s: set twice (first on line %d)", c->name,
                c->lineno, where, section, where_end, key, c->seen_line[idx]);
        return 0;
    }
    char why[WHY_CAP];
    pds_status_t st = set_field(&s->fields[idx], c->tmp, value ? value : "", why);
    if (st != PDS_OK) {
        c->err_line = c->lineno;
        PDS_ERR(st, "%s:%d: %s%s%s%s: %s", c->name, c->lineno, where, section, where_end, key, why);
        return 0;
    }
    c->seen_line[idx] = c->lineno;
    return 1;
}

static pds_status_t load(const pds_config_schema_t *s, void *obj, load_ctx_t *c)
{
    pds_status_t st = PDS_OK;
    c->schema = s;
    c->tmp = pds_malloc(s->obj_size);
    if (!c->tmp) {
        st = PDS_ERR(PDS_ERR_NO_MEMORY, "config %s: no memory for a %zu-byte copy", c->name,
                     s->obj_size);
        goto fail_tmp;
    }
    c->seen_line = pds_calloc((size_t)s->n_fields + 1, sizeof(int));
    if (!c->seen_line) {
        st = PDS_ERR(PDS_ERR_NO_MEMORY, "config %s: no memory", c->name);
        goto fail_seen;
    }
    memcpy(c->tmp, obj, s->obj_size);
    int ret = ini_parse_stream(read_line, c, on_pair, c);
    if (ret == -2) {
        st = PDS_ERR(PDS_ERR_NO_MEMORY, "config %s: inih ran out of memory", c->name);
    } else if (ret > 0 && (!c->err_line || ret < c->err_line)) {
        st = PDS_ERR(PDS_ERR_PARSE, "%s:%d: not INI syntax (expected [section] or key = value)",
                     c->name, ret);
    } else if (c->err_line) {
        st = pds_err_status();
    } else if (c->file && ferror(c->file)) {
        st = PDS_ERR(PDS_ERR_IO, "config %s: read error", c->name);
    } else {
        memcpy(obj, c->tmp, s->obj_size);
    }
    pds_free(c->seen_line);
fail_seen:
    pds_free(c->tmp);
fail_tmp:
    return st;
}

pds_status_t pds_config_load_file(const pds_config_schema_t *s, void *obj, const char *path)
{
    PDS_TRY(pds_config_schema_check(s));
    if (!obj || !path) return PDS_ERR(PDS_ERR_INVALID_ARG, "config load: NULL obj or path");
    FILE *f = fopen(path, "r");
    if (!f) return PDS_ERR(PDS_ERR_IO, "cannot open config file %s: %s", path, strerror(errno));
    load_ctx_t c = {.name = path, .file = f};
    pds_status_t st = load(s, obj, &c);
    fclose(f);
    return st;
}

pds_status_t pds_config_load_string(const pds_config_schema_t *s, void *obj, const char *text,
                                    const char *name)
{
    PDS_TRY(pds_config_schema_check(s));
    if (!obj || !text) return PDS_ERR(PDS_ERR_INVALID_ARG, "config load: NULL obj or text");
    load_ctx_t c = {.name = name ? name : "<string>", .str = text};
    return load(s, obj, &c);
}

/* ---- command line -----------------------------------------------------------------------------
 */
/* One pass over argv: applies overrides to obj; if `compact`, also moves the other arguments to
 * the front of argv. Run once to validate into a copy, then again to compact. */
static pds_status_t scan_args(const pds_config_schema_t *s, void *obj, int argc, char **argv,
                              bool compact, int *n_rest)
{
    int n = 0;
    bool passthrough = false;
    for (int i = 0; i < argc; i++) {
        char *a = argv[i];
        if (passthrough || strncmp(a, "--", 2) != 0 || a[2] == '\0' || a[2] == '-') {
            if (!passthrough && !strcmp(a, "--")) {
                passthrough = true;
                continue;
            }
            if (compact) argv[n] = a;
            n++;
            continue;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t name_len = eq ? (size_t)(eq - name) : strlen(name);
        const char *dot = memchr(name, '.', name_len);
        int idx;
        if (dot) {
            size_t sec_len = (size_t)(dot - name);
            idx = find_field(s, name, sec_len, dot + 1, name_len - sec_len - 1);
            if (idx < 0) {
                if (section_known(s, name, sec_len))
                    return PDS_ERR(PDS_ERR_INVALID_ARG,
                                   "--%.*s: unknown option (no key '%.*s' in [%.*s])",
                                   (int)name_len, name, (int)(name_len - sec_len - 1), dot + 1,
                                   (int)sec_len, name);
                return PDS_ERR(PDS_ERR_INVALID_ARG, "--%.*s: unknown option (no section [%.*s])",
                               (int)name_len, name, (int)sec_len, name);
            }
        } else {
            idx = find_field(s, "", 0, name, name_len);
            if (idx < 0) { /* not ours: the caller's own flag */
                if (compact) argv[n] = a;
                n++;
                continue;
            }
        }
        const pds_config_field_t *f = &s->fields[idx];
        char flag[160];
        flag_name(f, flag, sizeof(flag));
        const char *value;
        if (eq)
            value = eq + 1;
        else if (f->type == PDS_CONFIG_BOOL)
            value = "true";
        else if (i + 1 < argc)
            value = argv[++i];
        else
            return PDS_ERR(PDS_ERR_INVALID_ARG, "--%s: missing value", flag);
        char why[WHY_CAP];
        pds_status_t st = set_field(f, obj, value, why);
        if (st != PDS_OK) return PDS_ERR(st, "--%s: %s", flag, why);
    }
    *n_rest = n;
    return PDS_OK;
}

pds_status_t pds_config_apply_args(const pds_config_schema_t *s, void *obj, int argc, char **argv,
                                   int *n_rest)
{
    PDS_TRY(pds_config_schema_check(s));
    if (!obj || argc < 0 || (argc > 0 && !argv) || !n_rest)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "config args: NULL obj/argv/n_rest or argc < 0");
    void *tmp = pds_malloc(s->obj_size);
    if (!tmp) return PDS_ERR(PDS_ERR_NO_MEMORY, "config args: no memory for a copy");
    memcpy(tmp, obj, s->obj_size);
    int n = 0;
    pds_status_t st = scan_args(s, tmp, argc, argv, false, &n);
    if (st == PDS_OK) {
        memcpy(obj, tmp, s->obj_size);
        PDS_ASSERT(scan_args(s, tmp, argc, argv, true, &n) == PDS_OK);
        *n_rest = n;
    }
    pds_free(tmp);
    return st;
}

/* ---- output -----------------------------------------------------------------------------------
 */
static pds_status_t print_section(const pds_config_schema_t *s, const void *obj, FILE *f,
                                  const char *section)
{
    for (int i = 0; i < s->n_fields; i++) {
        const pds_config_field_t *fl = &s->fields[i];
        if (strcmp(fl->section, section)) continue;
        char val[512];
        PDS_TRY(format_value(fl, obj, val, sizeof(val)));
        if (fl->help && fl->help[0]) fprintf(f, "; %s\n", fl->help);
        fprintf(f, "%s = %s\n", fl->key, val);
    }
    return PDS_OK;
}

pds_status_t pds_config_print(const pds_config_schema_t *s, const void *obj, FILE *f)
{
    PDS_TRY(pds_config_schema_check(s));
    if (!obj || !f) return PDS_ERR(PDS_ERR_INVALID_ARG, "config print: NULL obj or file");
    PDS_TRY(print_section(s, obj, f, "")); /* top-level keys must come before any [section] */
    bool first = !section_known(s, "", 0);
    for (int i = 0; i < s->n_fields; i++) {
        const char *sec = s->fields[i].section;
        bool earlier = false;
        for (int j = 0; j < i && !earlier; j++) earlier = !strcmp(s->fields[j].section, sec);
        if (earlier || !sec[0]) continue;
        fprintf(f, "%s[%s]\n", first ? "" : "\n", sec);
        first = false;
        PDS_TRY(print_section(s, obj, f, sec));
    }
    if (ferror(f)) return PDS_ERR(PDS_ERR_IO, "config print: write error");
    return PDS_OK;
}

pds_status_t pds_config_help(const pds_config_schema_t *s, FILE *f)
{
    PDS_TRY(pds_config_schema_check(s));
    if (!f) return PDS_ERR(PDS_ERR_INVALID_ARG, "config help: NULL file");
    for (int i = 0; i < s->n_fields; i++) {
        const pds_config_field_t *fl = &s->fields[i];
        char flag[160];
        flag_name(fl, flag, sizeof(flag));
        if (fl->type == PDS_CONFIG_ENUM) {
            fprintf(f, "  --%s=<", flag);
            for (int c = 0; fl->choices[c]; c++) fprintf(f, "%s%s", c ? "|" : "", fl->choices[c]);
            fprintf(f, ">\n");
        } else {
            fprintf(f, "  --%s=<%s>\n", flag, type_name(fl->type));
        }
        fprintf(f, "      %s (default: %s", fl->help ? fl->help : "", default_text(fl));
        if (fl->min || fl->max)
            fprintf(f, "; range: %s..%s", fl->min ? fl->min : "", fl->max ? fl->max : "");
        fprintf(f, ")\n");
    }
    if (ferror(f)) return PDS_ERR(PDS_ERR_IO, "config help: write error");
    return PDS_OK;
}
