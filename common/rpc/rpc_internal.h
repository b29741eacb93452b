/* rpc_internal.h: what rpc.c, rpc_server.c and rpc_client.c share — message packing into gRPC byte
 * buffers, unpacking through pds_malloc, deadlines, library init. Only files of common/rpc include
 * this (it pulls in gRPC headers). */
#ifndef PDS_RPC_INTERNAL_H
#define PDS_RPC_INTERNAL_H

#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include "rpc/rpc.h"

/* Packs msg into a new byte buffer (bytes through pds_malloc). NULL + PDS_ERR on failure. */
grpc_byte_buffer *rpc_pack(const ProtobufCMessage *msg);
/* The same from raw bytes (copied). */
grpc_byte_buffer *rpc_pack_raw(const void *data, size_t len);
/* Unpacks a received buffer as `desc`; PDS_ERR_PARSE "malformed <full name>" when the bytes do not
 * parse, PDS_ERR_NO_MEMORY. */
pds_status_t rpc_unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc,
                        ProtobufCMessage **out);
/* Absolute deadline timeout_ms from now; infinite for timeout_ms <= 0. */
gpr_timespec rpc_deadline(int timeout_ms);
/* A gpr deadline as pds_time_now_ns() time; INT64_MAX for infinite. */
int64_t rpc_deadline_to_ns(gpr_timespec deadline);
/* Credentials for listening / connecting: plaintext today; TLS goes here (and only here). */
grpc_server_credentials *rpc_server_credentials(void);
grpc_channel_credentials *rpc_channel_credentials(void);
/* grpc_init / grpc_shutdown, counted by gRPC itself; wrapped so every object pairs them. */
void rpc_lib_ref(void);
void rpc_lib_unref(void);

#endif /* PDS_RPC_INTERNAL_H */
