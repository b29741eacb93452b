/* Tests of common/config: defaults, INI loading and every error with its status and located detail,
 * command-line overrides and their precedence, print -> load round trip, help, schema checks,
 * all-or-nothing behaviour under allocation failure. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config/config.h"

typedef struct {
    char name[32];
    int port;
    int role;
    int64_t timeout_ns;
    int64_t max_tokens;
    double ratio;
    bool verbose;
    int64_t pool_bytes;
    char model[64];
} node_cfg_t;

static const char *const roles[] = {"prefill", "decode", "colocated", NULL};

static const pds_config_field_t fields[] = {
    {"", "name", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(node_cfg_t, name), .def = "node-0",
     .help = "node name"},
    {"server", "port", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(node_cfg_t, port), .def = "8000",
     .min = "1", .max = "65535", .help = "listen port"},
    {"server", "role", PDS_CONFIG_ENUM, PDS_CONFIG_MEMBER(node_cfg_t, role), .def = "decode",
     .choices = roles, .help = "what this node does"},
    {"server", "timeout", PDS_CONFIG_DURATION, PDS_CONFIG_MEMBER(node_cfg_t, timeout_ns),
     .def = "250ms", .min = "1ms", .max = "1h", .help = "RPC deadline"},
    {"engine", "max_tokens", PDS_CONFIG_INT64, PDS_CONFIG_MEMBER(node_cfg_t, max_tokens),
     .def = "4096", .min = "1", .help = "tokens per step"},
    {"engine", "ratio", PDS_CONFIG_DOUBLE, PDS_CONFIG_MEMBER(node_cfg_t, ratio), .def = "0.5",
     .min = "0", .max = "1", .help = "memory fraction"},
    {"engine", "verbose", PDS_CONFIG_BOOL, PDS_CONFIG_MEMBER(node_cfg_t, verbose),
     .help = "log every step"},
    {"engine", "pool", PDS_CONFIG_SIZE, PDS_CONFIG_MEMBER(node_cfg_t, pool_bytes), .def = "64MiB",
     .min = "1MiB", .help = "KV pool size"},
    {"engine", "model", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(node_cfg_t, model),
     .help = "model path"},
};
static const pds_config_schema_t schema = {fields, PDS_ARRAY_LEN(fields), sizeof(node_cfg_t)};

static node_cfg_t defaults(void)
{
    node_cfg_t c;
    memset(&c, 0, sizeof(c)); /* padding too, so whole structs compare with memcmp */
    cr_assert_eq(pds_config_defaults(&schema, &c), PDS_OK, "%s", pds_err_detail());
    return c;
}

/* Writes text to a fresh temporary file; returns its path (static buffer, one at a time). */
static const char *write_tmp(const char *text)
{
    static char path[256];
    snprintf(path, sizeof(path), "/tmp/pds_test_config_XXXXXX");
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    size_t n = strlen(text);
    cr_assert_eq(write(fd, text, n), (ssize_t)n);
    close(fd);
    return path;
}

static void expect_detail(const char *needle)
{
    cr_expect(strstr(pds_err_detail(), needle) != NULL, "detail '%s' lacks '%s'", pds_err_detail(),
              needle);
}

Test(config, defaults_fill_every_field)
{
    node_cfg_t c = defaults();
    cr_expect_str_eq(c.name, "node-0");
    cr_expect_eq(c.port, 8000);
    cr_expect_eq(c.role, 1);
    cr_expect_eq(c.timeout_ns, 250000000);
    cr_expect_eq(c.max_tokens, 4096);
    cr_expect_eq(c.ratio, 0.5);
    cr_expect_eq(c.verbose, false);
    cr_expect_eq(c.pool_bytes, 64LL << 20);
    cr_expect_str_eq(c.model, "");
}

Test(config, file_values_override_defaults_and_others_stay)
{
    node_cfg_t c = defaults();
    const char *path = write_tmp("\xEF\xBB\xBF" /* BOM */
                                 "name = decode-7\r\n"
                                 "# comment\n"
                                 "[server]\n"
                                 "  port = 9100   ; inline comment\n"
                                 "role=colocated\n"
                                 "\n"
                                 "[engine]\n"
                                 "\tpool = 1.5GiB\n"
                                 "verbose = Yes\n"
                                 "model = /models/llama 3/8b\n"
                                 "ratio = 1e-3\n");
    cr_assert_eq(pds_config_load_file(&schema, &c, path), PDS_OK, "%s", pds_err_detail());
    unlink(path);
    cr_expect_str_eq(c.name, "decode-7");
    cr_expect_eq(c.port, 9100);
    cr_expect_eq(c.role, 2);
    cr_expect_eq(c.pool_bytes, 3LL << 29);
    cr_expect_eq(c.verbose, true);
    cr_expect_str_eq(c.model, "/models/llama 3/8b");
    cr_expect_eq(c.ratio, 1e-3);
    cr_expect_eq(c.timeout_ns, 250000000); /* not in the file: default kept */
    cr_expect_eq(c.max_tokens, 4096);
}

Test(config, value_syntax_per_type)
{
    struct {
        const char *text;
        int64_t timeout, pool;
    } cases[] = {
        {"[server]\ntimeout = 1.5s\n[engine]\npool = 2MB\n", 1500000000LL, 2000000},
        {"[server]\ntimeout = 1h\n[engine]\npool = 1.5MiB\n", 3600000000000LL, 1572864},
        {"[server]\ntimeout = 9000us\n[engine]\npool = 3000000\n", 9000000, 3000000},
        {"[server]\ntimeout = 7m\n[engine]\npool = 2TB\n", 420000000000LL, 2000000000000LL},
        {"[server]\ntimeout = 1.0005ms\n[engine]\npool = 1048576B\n", 1000500, 1048576},
    };
    for (size_t i = 0; i < PDS_ARRAY_LEN(cases); i++) {
        node_cfg_t c = defaults();
        cr_assert_eq(pds_config_load_string(&schema, &c, cases[i].text, "t.ini"), PDS_OK,
                     "case %zu: %s", i, pds_err_detail());
        cr_expect_eq(c.timeout_ns, cases[i].timeout, "case %zu", i);
        cr_expect_eq(c.pool_bytes, cases[i].pool, "case %zu", i);
    }
    node_cfg_t c = defaults();
    cr_assert_eq(pds_config_load_string(&schema, &c, "[engine]\nverbose = on\n", "b.ini"), PDS_OK);
    cr_expect(c.verbose);
    cr_assert_eq(pds_config_load_string(&schema, &c, "[engine]\nverbose = 0\n", "b.ini"), PDS_OK);
    cr_expect(!c.verbose);
}

/* Each bad input: status, detail substring, and obj left exactly as it was. */
Test(config, each_file_error_is_located_and_changes_nothing)
{
    struct {
        const char *text;
        pds_status_t status;
        const char *detail;
    } cases[] = {
        {"[server]\nport = 9\n[nope]\nport = 1\n", PDS_ERR_INVALID_ARG,
         "bad.ini:4: [nope] port: unknown section"},
        {"[server]\nprot = 9\n", PDS_ERR_INVALID_ARG, "bad.ini:2: [server] prot: unknown key"},
        {"colour = red\n", PDS_ERR_INVALID_ARG, "bad.ini:1: colour: unknown key"},
        {"[server]\nport = abc\n", PDS_ERR_PARSE,
         "bad.ini:2: [server] port: 'abc' is not an integer"},
        {"[server]\nport = 12x\n", PDS_ERR_PARSE, "[server] port: '12x' is not an integer"},
        {"[server]\nport = 3000000000\n", PDS_ERR_PARSE, "'3000000000' does not fit in int"},
        {"[engine]\nmax_tokens = 99999999999999999999\n", PDS_ERR_PARSE, "does not fit in int64"},
        {"[server]\n\nport = 70000\n", PDS_ERR_INVALID_ARG,
         "bad.ini:3: [server] port: 70000 is above the maximum 65535"},
        {"[server]\nport = 0\n", PDS_ERR_INVALID_ARG, "[server] port: 0 is below the minimum 1"},
        {"[engine]\nratio = 1.5\n", PDS_ERR_INVALID_ARG, "ratio: 1.5 is above the maximum 1"},
        {"[engine]\nratio = nan\n", PDS_ERR_PARSE, "'nan' is not a number"},
        {"[server]\nrole = router\n", PDS_ERR_PARSE,
         "[server] role: 'router' is not one of prefill|decode|colocated"},
        {"[server]\ntimeout = 250\n", PDS_ERR_PARSE, "[server] timeout: '250' is not a duration"},
        {"[server]\ntimeout = 5 parsecs\n", PDS_ERR_PARSE, "'5 parsecs' is not a duration"},
        {"[server]\ntimeout = 2h1m\n", PDS_ERR_PARSE, "is not a duration"},
        {"[server]\ntimeout = 0\n", PDS_ERR_INVALID_ARG, "0 is below the minimum 1ms"},
        {"[server]\ntimeout = 2h\n", PDS_ERR_INVALID_ARG, "2h is above the maximum 1h"},
        {"[engine]\npool = 64mb\n", PDS_ERR_PARSE, "[engine] pool: '64mb' is not a size"},
        {"[engine]\npool = -1MiB\n", PDS_ERR_PARSE, "'-1MiB' is a negative size"},
        {"[engine]\nverbose = maybe\n", PDS_ERR_PARSE,
         "[engine] verbose: 'maybe' is not a boolean"},
        {"name = a-name-that-is-far-too-long-for-32-bytes\n", PDS_ERR_INVALID_ARG,
         "bad.ini:1: name: value of 40 bytes does not fit (at most 31)"},
        {"[server]\nport = 1\nport = 2\n", PDS_ERR_INVALID_ARG,
         "bad.ini:3: [server] port: set twice (first on line 2)"},
        {"[server]\nport = 9\ngarbage\n", PDS_ERR_PARSE,
         "bad.ini:3: not INI syntax (expected [section] or key = value)"},
        {"[server\nport = 9\n", PDS_ERR_PARSE, "bad.ini:1: not INI syntax"},
        {"[server]\nport = abc\n[x\n", PDS_ERR_PARSE, "bad.ini:2: [server] port"},
        {"[server]\n[x\nport = abc\n", PDS_ERR_PARSE, "bad.ini:2: not INI syntax"},
    };
    for (size_t i = 0; i < PDS_ARRAY_LEN(cases); i++) {
        node_cfg_t c = defaults(), before = c;
        pds_err_clear();
        pds_status_t s = pds_config_load_string(&schema, &c, cases[i].text, "bad.ini");
        cr_expect_eq(s, cases[i].status, "case %zu: %s, detail '%s'", i, pds_status_name(s),
                     pds_err_detail());
        expect_detail(cases[i].detail);
        cr_expect_eq(memcmp(&c, &before, sizeof(c)), 0, "case %zu changed the config", i);
    }
}

Test(config, long_lines_are_an_error_but_long_comments_are_not)
{
    char text[600];
    node_cfg_t c = defaults(), before = c;
    snprintf(text, sizeof(text), "; %0300d\n[server]\nport = 7\n", 0);
    cr_expect_eq(pds_config_load_string(&schema, &c, text, "l.ini"), PDS_OK, "%s",
                 pds_err_detail());
    cr_expect_eq(c.port, 7);
    c = before;
    snprintf(text, sizeof(text), "[engine]\nmodel = /%0250d\n", 0);
    cr_expect_eq(pds_config_load_string(&schema, &c, text, "l.ini"), PDS_ERR_PARSE);
    expect_detail("l.ini:2: line longer than 197 bytes");
    cr_expect_eq(memcmp(&c, &before, sizeof(c)), 0);
}

Test(config, missing_file_is_an_io_error_naming_the_path)
{
    node_cfg_t c = defaults(), before = c;
    cr_expect_eq(pds_config_load_file(&schema, &c, "/nonexistent/dir/node.ini"), PDS_ERR_IO);
    expect_detail("/nonexistent/dir/node.ini");
    expect_detail("No such file");
    cr_expect_eq(memcmp(&c, &before, sizeof(c)), 0);
}

Test(config, file_errors_name_the_file_path)
{
    node_cfg_t c = defaults();
    const char *path = write_tmp("[server]\nport = -5\n");
    char want[300];
    snprintf(want, sizeof(want), "%s:2: [server] port: -5 is below the minimum 1", path);
    cr_expect_eq(pds_config_load_file(&schema, &c, path), PDS_ERR_INVALID_ARG);
    unlink(path);
    expect_detail(want);
}

Test(config, args_override_and_leave_other_arguments_in_order)
{
    node_cfg_t c = defaults();
    char *argv[] = {"pos1",
                    "--server.port=9000",
                    "--config",
                    "a.ini",
                    "--engine.verbose",
                    "--engine.max_tokens",
                    "77",
                    "--name=n2",
                    "-v",
                    "--server.role",
                    "prefill",
                    "--",
                    "--server.port=2",
                    "tail"};
    int n = -1;
    cr_assert_eq(pds_config_apply_args(&schema, &c, PDS_ARRAY_LEN(argv), argv, &n), PDS_OK, "%s",
                 pds_err_detail());
    cr_expect_eq(c.port, 9000);
    cr_expect(c.verbose);
    cr_expect_eq(c.max_tokens, 77);
    cr_expect_str_eq(c.name, "n2");
    cr_expect_eq(c.role, 0);
    cr_assert_eq(n, 6);
    const char *rest[] = {"pos1", "--config", "a.ini", "-v", "--server.port=2", "tail"};
    for (int i = 0; i < n; i++) cr_expect_str_eq(argv[i], rest[i], "rest %d", i);

    char *argv2[] = {"--engine.verbose=false", "--server.port", "1", "--server.port=2"};
    cr_assert_eq(pds_config_apply_args(&schema, &c, 4, argv2, &n), PDS_OK);
    cr_expect(!c.verbose);
    cr_expect_eq(c.port, 2); /* the later one wins */
    cr_expect_eq(n, 0);
}

Test(config, each_arg_error_names_the_flag_and_changes_nothing)
{
    struct {
        const char *arg, *arg2;
        pds_status_t status;
        const char *detail;
    } cases[] = {
        {"--server.prot=1", NULL, PDS_ERR_INVALID_ARG,
         "--server.prot: unknown option (no key 'prot' in [server])"},
        {"--srv.port=1", NULL, PDS_ERR_INVALID_ARG,
         "--srv.port: unknown option (no section [srv])"},
        {"--server.port", NULL, PDS_ERR_INVALID_ARG, "--server.port: missing value"},
        {"--server.port=x1", NULL, PDS_ERR_PARSE, "--server.port: 'x1' is not an integer"},
        {"--server.port", "99999", PDS_ERR_INVALID_ARG,
         "--server.port: 99999 is above the maximum 65535"},
        {"--server.role=boss", NULL, PDS_ERR_PARSE, "--server.role: 'boss' is not one of"},
        {"--engine.model=a ; b", NULL, PDS_ERR_PARSE, "--engine.model: value contains ' ;'"},
        {"--engine.model=a\nb", NULL, PDS_ERR_PARSE, "--engine.model: control character 0x0a"},
    };
    for (size_t i = 0; i < PDS_ARRAY_LEN(cases); i++) {
        node_cfg_t c = defaults(), before = c;
        char *argv[4] = {"--engine.verbose", "keep", (char *)cases[i].arg, (char *)cases[i].arg2};
        int argc = cases[i].arg2 ? 4 : 3, n = -1;
        pds_status_t s = pds_config_apply_args(&schema, &c, argc, argv, &n);
        cr_expect_eq(s, cases[i].status, "case %zu: %s '%s'", i, pds_status_name(s),
                     pds_err_detail());
        expect_detail(cases[i].detail);
        cr_expect_eq(n, -1);
        cr_expect_str_eq(argv[0], "--engine.verbose"); /* argv untouched on error */
        cr_expect_str_eq(argv[1], "keep");
        cr_expect_eq(memcmp(&c, &before, sizeof(c)), 0, "case %zu changed the config", i);
    }
}

Test(config, command_line_overrides_the_file)
{
    node_cfg_t c = defaults();
    cr_assert_eq(pds_config_load_string(&schema, &c,
                                        "[server]\nport = 8100\ntimeout = 2s\n[engine]\nratio = "
                                        "0.25\n",
                                        "f.ini"),
                 PDS_OK);
    char *argv[] = {"--server.port=9000", "--engine.ratio", "0.75"};
    int n;
    cr_assert_eq(pds_config_apply_args(&schema, &c, 3, argv, &n), PDS_OK);
    cr_expect_eq(c.port, 9000);
    cr_expect_eq(c.ratio, 0.75);
    cr_expect_eq(c.timeout_ns, 2000000000LL); /* from the file */
    cr_expect_eq(c.max_tokens, 4096);         /* default */
}

Test(config, print_writes_ini_that_loads_back_to_the_same_values)
{
    node_cfg_t a = defaults();
    snprintf(a.name, sizeof(a.name), "p 1");
    a.port = 1234;
    a.role = 2;
    a.timeout_ns = 1500000;      /* 1500us */
    a.max_tokens = 9000000000LL; /* beyond int */
    a.ratio = 0.1;               /* shortest round-trip form */
    a.verbose = true;
    a.pool_bytes = (3LL << 20) + 1; /* not a whole KiB: printed in bytes */
    snprintf(a.model, sizeof(a.model), "/m/x y;z");
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert_not_null(f);
    cr_assert_eq(pds_config_print(&schema, &a, f), PDS_OK);
    fclose(f);
    cr_expect_str_eq(buf, "; node name\n"
                          "name = p 1\n"
                          "\n"
                          "[server]\n"
                          "; listen port\n"
                          "port = 1234\n"
                          "; what this node does\n"
                          "role = colocated\n"
                          "; RPC deadline\n"
                          "timeout = 1500us\n"
                          "\n"
                          "[engine]\n"
                          "; tokens per step\n"
                          "max_tokens = 9000000000\n"
                          "; memory fraction\n"
                          "ratio = 0.1\n"
                          "; log every step\n"
                          "verbose = true\n"
                          "; KV pool size\n"
                          "pool = 3145729\n"
                          "; model path\n"
                          "model = /m/x y;z\n");
    node_cfg_t b = defaults();
    cr_assert_eq(pds_config_load_string(&schema, &b, buf, "printed"), PDS_OK, "%s",
                 pds_err_detail());
    free(buf);
    cr_expect_eq(memcmp(&a, &b, sizeof(a)), 0);

    /* And the defaults print and reload to themselves. */
    node_cfg_t d = defaults(), e;
    memset(&e, 0, sizeof(e));
    f = open_memstream(&buf, &len);
    cr_assert_eq(pds_config_print(&schema, &d, f), PDS_OK);
    fclose(f);
    cr_expect(strstr(buf, "timeout = 250ms\n") && strstr(buf, "pool = 64MiB\n"), "%s", buf);
    cr_assert_eq(pds_config_load_string(&schema, &e, buf, "printed"), PDS_OK);
    free(buf);
    cr_expect_eq(memcmp(&d, &e, sizeof(d)), 0);
}

Test(config, help_lists_flags_defaults_ranges_and_choices)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert_eq(pds_config_help(&schema, f), PDS_OK);
    fclose(f);
    const char *want[] = {
        "  --server.port=<int>\n      listen port (default: 8000; range: 1..65535)\n",
        "  --server.role=<prefill|decode|colocated>\n",
        "  --name=<string>\n      node name (default: node-0)\n",
        "  --engine.pool=<size>\n      KV pool size (default: 64MiB; range: 1MiB..)\n",
        "  --engine.verbose=<bool>\n      log every step (default: false)\n"};
    for (size_t i = 0; i < PDS_ARRAY_LEN(want); i++)
        cr_expect(strstr(buf, want[i]) != NULL, "help lacks '%s':\n%s", want[i], buf);
    free(buf);
}

Test(config, schema_mistakes_are_reported)
{
    static const char *const none[] = {NULL};
    struct {
        pds_config_field_t f;
        const char *detail;
    } cases[] = {
        {{"s", "k", PDS_CONFIG_INT64, PDS_CONFIG_MEMBER(node_cfg_t, port)},
         "schema: [s] k: member size 4 does not hold a int64"},
        {{"s", "k", PDS_CONFIG_INT, .offset = offsetof(node_cfg_t, port)},
         "schema: [s] k: member size 0"},
        {{"s", "k", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(node_cfg_t, port), .def = "0", .min = "1"},
         "schema: [s] k: default: 0 is below the minimum 1"},
        {{"s", "k", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(node_cfg_t, port), .min = "5", .max = "1"},
         "schema: [s] k: min 5 > max 1"},
        {{"s", "k", PDS_CONFIG_DURATION, PDS_CONFIG_MEMBER(node_cfg_t, timeout_ns), .max = "3"},
         "schema: [s] k: max: '3' is not a duration"},
        {{"s", "k", PDS_CONFIG_ENUM, PDS_CONFIG_MEMBER(node_cfg_t, role), .choices = none},
         "schema: [s] k: enum without choices"},
        {{"s", "k", PDS_CONFIG_BOOL, PDS_CONFIG_MEMBER(node_cfg_t, verbose), .min = "1"},
         "schema: [s] k: min/max on a bool"},
        {{"s", "a.b", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(node_cfg_t, port)},
         "section and key must be"},
        {{"s", "k", PDS_CONFIG_INT, .offset = sizeof(node_cfg_t), .size = sizeof(int)},
         "outside obj_size"},
    };
    for (size_t i = 0; i < PDS_ARRAY_LEN(cases); i++) {
        pds_config_schema_t s = {&cases[i].f, 1, sizeof(node_cfg_t)};
        node_cfg_t c;
        cr_expect_eq(pds_config_defaults(&s, &c), PDS_ERR_INVALID_ARG, "case %zu", i);
        expect_detail(cases[i].detail);
    }
    pds_config_field_t twice[2] = {
        {"s", "k", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(node_cfg_t, port)},
        {"s", "k", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(node_cfg_t, max_tokens) /* wrong size too */},
    };
    twice[1].size = sizeof(int);
    pds_config_schema_t s2 = {twice, 2, sizeof(node_cfg_t)};
    cr_expect_eq(pds_config_schema_check(&s2), PDS_ERR_INVALID_ARG);
    expect_detail("schema: [s] k: declared twice");
    cr_expect_eq(pds_config_schema_check(&schema), PDS_OK);
}

Test(config, loads_are_all_or_nothing_under_allocation_failure)
{
    const char *text = "[server]\nport = 9001\n[engine]\nmodel = m\n";
    char *argv[] = {"--server.port=9002", "x"};
    int64_t before_blocks;
    pds_alloc_stats_t st;
    pds_alloc_stats(&st);
    before_blocks = st.live_blocks;
    for (int which = 0; which < 2; which++) {
        int failures = 0;
        for (int64_t n = 1; n < 10; n++) {
            node_cfg_t c = defaults(), before = c;
            int rest = -1;
            pds_alloc_fail_nth(n);
            pds_status_t s = which == 0 ? pds_config_load_string(&schema, &c, text, "a.ini")
                                        : pds_config_apply_args(&schema, &c, 2, argv, &rest);
            bool hit = pds_alloc_fail_triggered();
            pds_alloc_fail_nth(0);
            pds_alloc_stats(&st);
            cr_expect_eq(st.live_blocks, before_blocks, "leak at n=%lld", (long long)n);
            if (!hit) {
                cr_expect_eq(s, PDS_OK);
                cr_expect_eq(c.port, which == 0 ? 9001 : 9002);
                break;
            }
            failures++;
            cr_expect_eq(s, PDS_ERR_NO_MEMORY);
            cr_expect_eq(memcmp(&c, &before, sizeof(c)), 0);
            cr_expect_eq(rest, -1);
        }
        cr_expect_eq(failures, which == 0 ? 2 : 1);
    }
}
