/* Tests of common/tok: exact round trip of arbitrary bytes, BOS, capacity limits, validation. */
#include <criterion/criterion.h>
#include <string.h>

#include "tok/tok.h"

Test(tok, every_byte_round_trips_including_nul_and_invalid_utf8)
{
    char text[512];
    for (int i = 0; i < 512; i++) text[i] = (char)(i * 7 + 3); /* all 256 values, twice */
    text[10] = '\0';
    text[11] = (char)0xC3; /* truncated UTF-8 sequence */
    text[12] = (char)0xFF;
    int32_t ids[600];
    int n = -1;
    cr_assert_eq(pds_tok_encode(text, sizeof(text), -1, ids, 600, &n), PDS_OK);
    cr_expect_eq(n, 512);
    cr_expect_eq(ids[10], 0);
    cr_expect_eq(ids[11], 0xC3);
    cr_expect_eq(ids[12], 0xFF);
    for (int i = 0; i < n; i++) cr_assert(ids[i] >= 0 && ids[i] < 256);
    char back[513];
    size_t nb = 0;
    cr_assert_eq(pds_tok_decode(ids, n, back, sizeof(back), &nb), PDS_OK);
    cr_expect_eq(nb, 512);
    cr_expect_arr_eq(back, text, 512);
    cr_expect_eq(back[512], '\0');
    cr_expect_eq(pds_tok_validate(ids, n, PDS_TOK_MIN_VOCAB), PDS_OK);
}

Test(tok, bos_comes_first_and_specials_decode_to_nothing)
{
    int32_t ids[8];
    int n = 0;
    cr_assert_eq(pds_tok_encode("hi", 2, PDS_TOK_BOS, ids, 8, &n), PDS_OK);
    cr_expect_eq(n, 3);
    cr_expect_eq(ids[0], PDS_TOK_BOS);
    cr_expect_eq(ids[1], 'h');
    cr_expect_eq(ids[2], 'i');
    ids[3] = PDS_TOK_EOS;
    ids[4] = 100000; /* unused upper vocabulary */
    ids[5] = '!';
    char out[8];
    size_t nb = 0;
    cr_assert_eq(pds_tok_decode(ids, 6, out, sizeof(out), &nb), PDS_OK);
    cr_expect_eq(nb, 3);
    cr_expect_str_eq(out, "hi!");
    cr_assert_eq(pds_tok_encode("", 0, PDS_TOK_BOS, ids, 1, &n), PDS_OK);
    cr_expect_eq(n, 1);
    cr_assert_eq(pds_tok_encode(NULL, 0, -1, ids, 0, &n), PDS_OK);
    cr_expect_eq(n, 0);
}

Test(tok, encode_past_cap_is_out_of_range)
{
    int32_t ids[4];
    int n = 77;
    cr_expect_eq(pds_tok_encode("abcd", 4, -1, ids, 4, &n), PDS_OK);
    cr_expect_eq(n, 4);
    n = 77;
    cr_expect_eq(pds_tok_encode("abcd", 4, PDS_TOK_BOS, ids, 4, &n), PDS_ERR_OUT_OF_RANGE);
    cr_expect(strstr(pds_err_detail(), "5 ids needed, room for 4") != NULL, "detail: %s",
              pds_err_detail());
    cr_expect_eq(n, 77);
    cr_expect_eq(pds_tok_encode("abcde", 5, -1, ids, 4, &n), PDS_ERR_OUT_OF_RANGE);
    cr_expect_eq(pds_tok_encode("a", 1, -1, ids, -1, &n), PDS_ERR_INVALID_ARG);
}

Test(tok, decode_past_cap_is_out_of_range_and_nul_only_when_room)
{
    int32_t ids[4] = {'a', PDS_TOK_BOS, 'b', 'c'};
    char out[4] = {'x', 'x', 'x', 'x'};
    size_t nb = 99;
    cr_expect_eq(pds_tok_decode(ids, 4, out, 2, &nb), PDS_ERR_OUT_OF_RANGE);
    cr_expect(strstr(pds_err_detail(), "3 bytes needed, room for 2") != NULL);
    cr_expect_eq(nb, 99);
    cr_assert_eq(pds_tok_decode(ids, 4, out, 3, &nb), PDS_OK); /* exact fit: no NUL */
    cr_expect_eq(nb, 3);
    cr_expect_arr_eq(out, "abcx", 4);
    cr_assert_eq(pds_tok_decode(ids, 4, out, 4, &nb), PDS_OK);
    cr_expect_str_eq(out, "abc");
}

Test(tok, validate_names_the_first_bad_token)
{
    int32_t ids[5] = {1, 2, 9999, -1, 3};
    cr_expect_eq(pds_tok_validate(ids, 5, 512), PDS_ERR_OUT_OF_RANGE);
    cr_expect_str_eq(pds_err_detail(), "token 2 (id 9999) outside vocabulary of 512");
    cr_expect_eq(pds_tok_validate(ids + 3, 2, 512), PDS_ERR_OUT_OF_RANGE);
    cr_expect_str_eq(pds_err_detail(), "token 0 (id -1) outside vocabulary of 512");
    int32_t edge[2] = {0, 511};
    cr_expect_eq(pds_tok_validate(edge, 2, 512), PDS_OK);
    cr_expect_eq(pds_tok_validate(edge, 2, 511), PDS_ERR_OUT_OF_RANGE);
    cr_expect_str_eq(pds_err_detail(), "token 1 (id 511) outside vocabulary of 511");
    cr_expect_eq(pds_tok_validate(NULL, 0, 512), PDS_OK);
}
