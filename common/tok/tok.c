/* tok.c: the byte-level tokenizer — one id per byte, optional BOS in front, specials and the
 * unused upper vocabulary skipped on decode. There is nothing to learn or load, which is the point:
 * built-in models need a tokenizer whose round trip is exact for any byte string (0x00 and invalid
 * UTF-8 included), so tests can compare text and tokens without a vocabulary file. Decode skips
 * every id that is not a byte (negative ones too); pds_tok_validate is where bad ids are caught.
 */
#include "tok/tok.h"

pds_status_t pds_tok_encode(const char *text, size_t len, int32_t bos, int32_t *out, int cap,
                            int *n_out)
{
    if ((len > 0 && !text) || cap < 0 || (cap > 0 && !out) || !n_out)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "tok encode: NULL text/out/n_out or cap %d < 0", cap);
    size_t need = len + (bos >= 0 ? 1 : 0);
    if (need > (size_t)cap)
        return PDS_ERR(PDS_ERR_OUT_OF_RANGE, "tok encode: %zu ids needed, room for %d", need, cap);
    int n = 0;
    if (bos >= 0) out[n++] = bos;
    const unsigned char *b = (const unsigned char *)text;
    for (size_t i = 0; i < len; i++) out[n++] = b[i];
    *n_out = n;
    return PDS_OK;
}

pds_status_t pds_tok_decode(const int32_t *ids, int n, char *out, size_t cap, size_t *n_out)
{
    if (n < 0 || (n > 0 && !ids) || (cap > 0 && !out) || !n_out)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "tok decode: NULL ids/out/n_out or n %d < 0", n);
    size_t need = 0;
    for (int i = 0; i < n; i++) need += ids[i] >= 0 && ids[i] < 256;
    if (need > cap)
        return PDS_ERR(PDS_ERR_OUT_OF_RANGE, "tok decode: %zu bytes needed, room for %zu", need,
                       cap);
    size_t k = 0;
    for (int i = 0; i < n; i++)
        if (ids[i] >= 0 && ids[i] < 256) out[k++] = (char)(unsigned char)ids[i];
    if (k < cap) out[k] = '\0';
    *n_out = k;
    return PDS_OK;
}

pds_status_t pds_tok_validate(const int32_t *ids, int n, int vocab)
{
    if (n < 0 || (n > 0 && !ids))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "tok validate: NULL ids or n %d < 0", n);
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= vocab)
            return PDS_ERR(PDS_ERR_OUT_OF_RANGE, "token %d (id %d) outside vocabulary of %d", i,
                           ids[i], vocab);
    return PDS_OK;
}
