/* tok: the byte-level tokenizer of the built-in models. Ids 0..255 are bytes, 256 is BOS and 257
 * is EOS (PDS_TOK_BOS / PDS_TOK_EOS; built-in presets have vocab >= 258 and use them). Text
 * round-trips exactly, including invalid UTF-8. Ids >= 256 are not bytes: decoding skips them
 * (specials and the unused upper vocabulary of presets with the real Llama-3 vocabulary size).
 * Stateless and thread-safe.
 */
#ifndef PDS_TOK_H
#define PDS_TOK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

#define PDS_TOK_BOS       256
#define PDS_TOK_EOS       257
#define PDS_TOK_MIN_VOCAB 258

/* Writes optional bos (when bos >= 0) then one id per byte into out; PDS_ERR_OUT_OF_RANGE if more
 * than cap ids would be needed (nothing meaningful written then). */
pds_status_t pds_tok_encode(const char *text, size_t len, int32_t bos, int32_t *out, int cap,
                            int *n_out);
/* Appends the bytes of ids to out (cap bytes, NUL-terminated when room allows); ids >= 256 skipped.
 * *n_out gets the byte count. PDS_ERR_OUT_OF_RANGE if out is too small. */
pds_status_t pds_tok_decode(const int32_t *ids, int n, char *out, size_t cap, size_t *n_out);
/* PDS_ERR_OUT_OF_RANGE with a detail "token 5 (id 9999) outside vocabulary of 512" if any id is
 * negative or >= vocab. */
pds_status_t pds_tok_validate(const int32_t *ids, int n, int vocab);

#endif /* PDS_TOK_H */
