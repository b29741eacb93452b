/* rpc.c: what both sides of the gRPC layer share — the one pds_status_t <-> gRPC code mapping,
 * protobuf-c (un)packing into gRPC byte buffers with pds_malloc as the allocator, and deadline
 * conversion, credentials (the TLS hook) and routing gRPC's log into ours. Packing copies once into
 * a pds_malloc'ed buffer that gRPC then owns as a slice, so a message can be packed on any thread
 * and the caller keeps its message. */
#include "rpc/rpc_internal.h"

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/log.h>
#include <pthread.h>
#include <string.h>

#include "proto/pdserve.pb-c.h"

_Static_assert(PDS_RPC_PROTOCOL_MAGIC == PDSERVE__V1__PROTOCOL_MAGIC__PROTOCOL_MAGIC_PDSERVE,
               "rpc.h magic and pdserve.proto disagree");
_Static_assert(PDS_RPC_PROTOCOL_VERSION == PDSERVE__V1__PROTOCOL_VERSION__PROTOCOL_VERSION_CURRENT,
               "rpc.h protocol version and pdserve.proto disagree");

int pds_rpc_status_to_code(pds_status_t s)
{
    switch (s) {
    case PDS_OK:
        return GRPC_STATUS_OK;
    case PDS_ERR_INVALID_ARG:
    case PDS_ERR_PARSE:
        return GRPC_STATUS_INVALID_ARGUMENT;
    case PDS_ERR_OUT_OF_RANGE:
        return GRPC_STATUS_OUT_OF_RANGE;
    case PDS_ERR_NOT_FOUND:
        return GRPC_STATUS_NOT_FOUND;
    case PDS_ERR_ALREADY_EXISTS:
        return GRPC_STATUS_ALREADY_EXISTS;
    case PDS_ERR_EXHAUSTED:
    case PDS_ERR_NO_MEMORY:
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case PDS_ERR_TIMEOUT:
        return GRPC_STATUS_DEADLINE_EXCEEDED;
    case PDS_ERR_CANCELLED:
        return GRPC_STATUS_CANCELLED;
    case PDS_ERR_UNAVAILABLE:
    case PDS_AGAIN:
    case PDS_ERR_TRANSPORT:
        return GRPC_STATUS_UNAVAILABLE;
    case PDS_ERR_FAILED_PRECONDITION:
        return GRPC_STATUS_FAILED_PRECONDITION;
    case PDS_ERR_UNSUPPORTED:
        return GRPC_STATUS_UNIMPLEMENTED;
    case PDS_ERR_CORRUPT:
        return GRPC_STATUS_DATA_LOSS;
    default:
        return GRPC_STATUS_INTERNAL;
    }
}

pds_status_t pds_rpc_status_from_code(int code)
{
    switch (code) {
    case GRPC_STATUS_OK:
        return PDS_OK;
    case GRPC_STATUS_INVALID_ARGUMENT:
        return PDS_ERR_INVALID_ARG;
    case GRPC_STATUS_OUT_OF_RANGE:
        return PDS_ERR_OUT_OF_RANGE;
    case GRPC_STATUS_NOT_FOUND:
        return PDS_ERR_NOT_FOUND;
    case GRPC_STATUS_ALREADY_EXISTS:
        return PDS_ERR_ALREADY_EXISTS;
    case GRPC_STATUS_RESOURCE_EXHAUSTED:
        return PDS_ERR_EXHAUSTED;
    case GRPC_STATUS_DEADLINE_EXCEEDED:
        return PDS_ERR_TIMEOUT;
    case GRPC_STATUS_CANCELLED:
        return PDS_ERR_CANCELLED;
    case GRPC_STATUS_UNAVAILABLE:
        return PDS_ERR_UNAVAILABLE;
    case GRPC_STATUS_FAILED_PRECONDITION:
        return PDS_ERR_FAILED_PRECONDITION;
    case GRPC_STATUS_UNIMPLEMENTED:
        return PDS_ERR_UNSUPPORTED;
    case GRPC_STATUS_DATA_LOSS:
        return PDS_ERR_CORRUPT;
    default:
        return PDS_ERR_INTERNAL;
    }
}

/* ---- messages ------------------------------------------------------------------------------- */
static void *pb_alloc(void *unused, size_t size)
{
    return pds_malloc(size);
}

static void pb_free(void *unused, void *p)
{
    pds_free(p);
}

/* Read-only after initialisation; protobuf-c's API wants a non-const pointer. */
static ProtobufCAllocator pb_allocator = {pb_alloc, pb_free, NULL};

void pds_rpc_msg_free(ProtobufCMessage *msg)
{
    if (msg) protobuf_c_message_free_unpacked(msg, &pb_allocator);
}

/* Wraps a pds_malloc'ed buffer (ownership moves to gRPC) into a byte buffer. */
static grpc_byte_buffer *bb_adopt(void *buf, size_t len)
{
    grpc_slice slice;
    if (len == 0) {
        pds_free(buf);
        slice = grpc_empty_slice();
    } else {
        slice = grpc_slice_new(buf, len, pds_free);
    }
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    return bb;
}

grpc_byte_buffer *rpc_pack_raw(const void *data, size_t len)
{
    void *buf = pds_malloc(len);
    if (!buf) {
        PDS_ERR(PDS_ERR_NO_MEMORY, "no memory for a %zu-byte message", len);
        return NULL;
    }
    if (len) memcpy(buf, data, len);
    return bb_adopt(buf, len);
}

grpc_byte_buffer *rpc_pack(const ProtobufCMessage *msg)
{
    size_t len = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = pds_malloc(len);
    if (!buf) {
        PDS_ERR(PDS_ERR_NO_MEMORY, "no memory to pack a %zu-byte %s", len, msg->descriptor->name);
        return NULL;
    }
    size_t n = protobuf_c_message_pack(msg, buf);
    PDS_ASSERT(n == len);
    return bb_adopt(buf, len);
}

pds_status_t rpc_unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc,
                        ProtobufCMessage **out)
{
    grpc_byte_buffer_reader reader;
    if (!grpc_byte_buffer_reader_init(&reader, bb))
        return PDS_ERR(PDS_ERR_PARSE, "malformed %s (undecodable compression)", desc->name);
    grpc_slice s = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    ProtobufCMessage *m = protobuf_c_message_unpack(desc, &pb_allocator, GRPC_SLICE_LENGTH(s),
                                                    GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    if (!m) return PDS_ERR(PDS_ERR_PARSE, "malformed %s", desc->name);
    *out = m;
    return PDS_OK;
}

/* ---- time ----------------------------------------------------------------------------------- */
gpr_timespec rpc_deadline(int timeout_ms)
{
    if (timeout_ms <= 0) return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                        gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
}

int64_t rpc_deadline_to_ns(gpr_timespec deadline)
{
    if (gpr_time_cmp(deadline, gpr_inf_future(deadline.clock_type)) == 0) return INT64_MAX;
    /* gpr's monotonic clock has its own origin: go through "time left". */
    gpr_timespec left = gpr_time_sub(gpr_convert_clock_type(deadline, GPR_CLOCK_MONOTONIC),
                                     gpr_now(GPR_CLOCK_MONOTONIC));
    return pds_time_now_ns() + (int64_t)left.tv_sec * 1000000000 + left.tv_nsec;
}

/* ---- credentials: the one place per side where TLS will plug in --------------------------------
 */
grpc_server_credentials *rpc_server_credentials(void)
{
    return grpc_insecure_server_credentials_create();
}

grpc_channel_credentials *rpc_channel_credentials(void)
{
    return grpc_insecure_credentials_create();
}

/* gRPC's own log lines go through our logger (one format on stderr): its errors are mostly about
 * peers and sockets that we also report where we see them, so they come out as warnings. */
static void grpc_log_to_pds(gpr_log_func_args *a)
{
    pds_log_level_t lvl = a->severity == GPR_LOG_SEVERITY_ERROR  ? PDS_LOG_WARN
                          : a->severity == GPR_LOG_SEVERITY_INFO ? PDS_LOG_DEBUG
                                                                 : PDS_LOG_TRACE;
    if (pds_log_enabled(lvl))
        pds_log_write(lvl, "grpc", a->file, a->line, "grpc-core detail=\"%s\"", a->message);
}

static pthread_once_t log_once = PTHREAD_ONCE_INIT;

static void log_init(void)
{
    gpr_set_log_function(grpc_log_to_pds);
}

void rpc_lib_ref(void)
{
    pthread_once(&log_once, log_init);
    grpc_init();
}

void rpc_lib_unref(void)
{
    grpc_shutdown();
}
