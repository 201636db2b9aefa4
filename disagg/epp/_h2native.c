/* The EPP's gRPC server connection (HTTP/2 over h2c) in C: `disagg.epp.h2grpc`'s `_Connection`
 * frame for frame, plus the ext_proc Process method answered here without a Python call per
 * message. Sans-IO: `feed(bytes)` returns the bytes to write; the asyncio protocol around it is
 * `disagg.epp.h2grpc._NativeConnection`.
 *
 * Why: on a shared 2-core machine the EPP's per-request Python (HTTP/2 frames, gRPC messages,
 * parsing the ext_proc messages, building answers) ran 2-3x slower after each idle gap than back
 * to back, and that was most of the latency the ext_proc hop added. Here one request costs one
 * Python call: `route(path, body, metadata, as_headers)`, the pick itself.
 *
 * What stays in Python: HPACK decoding (`decode_head`, called only for a header block not seen
 * before: Envoy opens every stream with the same block), the pick and every answer that carries
 * a decision (built once in `disagg.epp.ext_proc`), the other methods' handlers (health), and the
 * constant answers, which the constructor takes as bytes. tests/unit/test_h2native.py holds this
 * engine to the Python one byte for byte on the same input. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Frame types, flags, error codes, settings (RFC 9113). */
enum { DATA = 0, HEADERS = 1, PRIORITY = 2, RST_STREAM = 3, SETTINGS = 4, PUSH_PROMISE = 5, PING = 6,
       GOAWAY = 7, WINDOW_UPDATE = 8, CONTINUATION = 9 };
enum { END_STREAM = 0x1, ACK = 0x1, END_HEADERS = 0x4, PADDED = 0x8, PRIORITY_FLAG = 0x20 };
enum { NO_ERROR = 0, PROTOCOL_ERROR = 1, INTERNAL_ERROR = 2, FLOW_CONTROL_ERROR = 3, FRAME_SIZE_ERROR = 6,
       REFUSED_STREAM = 7, COMPRESSION_ERROR = 9, ENHANCE_YOUR_CALM = 11 };
enum { SETTINGS_HEADER_TABLE_SIZE = 1, SETTINGS_MAX_CONCURRENT_STREAMS = 3, SETTINGS_INITIAL_WINDOW_SIZE = 4,
       SETTINGS_MAX_FRAME_SIZE = 5 };
/* gRPC status codes. */
enum { GRPC_OK = 0, GRPC_RESOURCE_EXHAUSTED = 8, GRPC_UNIMPLEMENTED = 12, GRPC_INTERNAL = 13 };

#define MAX_WINDOW 2147483647LL
#define DEFAULT_WINDOW 65535LL
#define DEFAULT_FRAME_SIZE 16384
#define MAX_STREAMS 1024
#define WINDOW_REFILL_AT (1LL << 30)
#define MAX_HEADER_BLOCK (1024 * 1024)

static const char PREFACE[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
#define PREFACE_LEN 24

/* ext_proc field numbers (envoy/service/ext_proc/v3/external_processor.proto). */
enum { REQ_HEADERS = 2, RESP_HEADERS = 3, REQ_BODY = 4, RESP_BODY = 5, REQ_TRAILERS = 6, RESP_TRAILERS = 7,
       REQ_METADATA = 8, REQ_PROTOCOL_CONFIG = 11 };
/* Body send modes (ProcessingMode.BodySendMode). */
enum { MODE_BUFFERED = 2, MODE_FULL_DUPLEX = 4 };
/* The constant answers, in the order the constructor takes them. */
enum { C_REQ_HEADERS, C_REQ_BODY, C_REQ_TRAILERS, C_RESP_HEADERS, C_RESP_BODY, C_RESP_TRAILERS, N_CONTINUES };

/* -- growable byte buffers ------------------------------------------------------------------ */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int buf_reserve(Buf *b, Py_ssize_t extra) {
    if (b->len + extra <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    char *data = PyMem_Realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int buf_put(Buf *b, const void *p, Py_ssize_t n) {
    if (n <= 0)
        return 0;
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

static int buf_byte(Buf *b, unsigned char c) { return buf_put(b, &c, 1); }

static void buf_consume(Buf *b, Py_ssize_t n) {
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

static void buf_free(Buf *b) {
    PyMem_Free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

static int put_u32(Buf *b, uint32_t v) {
    unsigned char x[4] = {v >> 24, v >> 16, v >> 8, v};
    return buf_put(b, x, 4);
}

static int put_frame(Buf *b, int kind, int flags, uint32_t stream_id, const void *payload, Py_ssize_t n) {
    unsigned char h[9] = {n >> 16, n >> 8, n, kind, flags, stream_id >> 24, stream_id >> 16, stream_id >> 8,
                          stream_id};
    if (buf_put(b, h, 9) < 0)
        return -1;
    return buf_put(b, payload, n);
}

static int put_grpc_frame(Buf *b, const char *message, Py_ssize_t n) {
    if (buf_byte(b, 0) < 0 || put_u32(b, (uint32_t)n) < 0)
        return -1;
    return buf_put(b, message, n);
}

/* -- HPACK literals for our responses, gRPC trailers ----------------------------------------- */

static int hpack_int(Buf *b, Py_ssize_t value, int prefix_bits, unsigned char flags) {
    Py_ssize_t limit = (1 << prefix_bits) - 1;
    if (value < limit)
        return buf_byte(b, flags | (unsigned char)value);
    if (buf_byte(b, flags | (unsigned char)limit) < 0)
        return -1;
    value -= limit;
    while (value >= 128) {
        if (buf_byte(b, (value & 0x7F) | 0x80) < 0)
            return -1;
        value >>= 7;
    }
    return buf_byte(b, (unsigned char)value);
}

/* A literal header field without indexing, new name, no Huffman coding. */
static int hpack_literal(Buf *b, const char *name, const char *value, Py_ssize_t value_len) {
    Py_ssize_t name_len = (Py_ssize_t)strlen(name);
    if (buf_byte(b, 0) < 0 || hpack_int(b, name_len, 7, 0) < 0 || buf_put(b, name, name_len) < 0)
        return -1;
    if (hpack_int(b, value_len, 7, 0) < 0)
        return -1;
    return buf_put(b, value, value_len);
}

/* `:status: 200` (static table entry 8) and the gRPC content type. */
static int response_headers(Buf *b) {
    static const char type[] = "application/grpc";
    if (buf_byte(b, 0x88) < 0)
        return -1;
    return hpack_literal(b, "content-type", type, sizeof(type) - 1);
}

/* grpc-status, and grpc-message percent-encoded (the gRPC over HTTP/2 spec). */
static PyObject *trailers(int code, const char *message, Py_ssize_t message_len, int with_headers) {
    Buf b = {0};
    char digits[16];
    int n = snprintf(digits, sizeof(digits), "%d", code);
    if ((with_headers && response_headers(&b) < 0) || hpack_literal(&b, "grpc-status", digits, n) < 0)
        goto fail;
    if (message_len > 0) {
        Buf encoded = {0};
        for (Py_ssize_t i = 0; i < message_len; i++) {
            unsigned char c = (unsigned char)message[i];
            if (c >= 0x20 && c <= 0x7E && c != 0x25) {
                if (buf_byte(&encoded, c) < 0)
                    goto fail_encoded;
            } else {
                char hex[4];
                snprintf(hex, sizeof(hex), "%%%02X", c);
                if (buf_put(&encoded, hex, 3) < 0)
                    goto fail_encoded;
            }
            continue;
        fail_encoded:
            buf_free(&encoded);
            goto fail;
        }
        int failed = hpack_literal(&b, "grpc-message", encoded.data, encoded.len);
        buf_free(&encoded);
        if (failed < 0)
            goto fail;
    }
    PyObject *out = PyBytes_FromStringAndSize(b.data, b.len);
    buf_free(&b);
    return out;
fail:
    buf_free(&b);
    return NULL;
}

/* -- protobuf wire reading ------------------------------------------------------------------- */

typedef struct {
    const unsigned char *p, *end;
} Reader;

/* 0 on success, -1 when the wire format is corrupt. */
static int read_varint(Reader *r, uint64_t *value) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end)
            return -1;
        unsigned char c = *r->p++;
        v |= (uint64_t)(c & 0x7F) << shift;
        if (!(c & 0x80)) {
            *value = v;
            return 0;
        }
    }
    return -1;
}

/* The next field: its number, wire type, and (length-delimited) its payload, or (varint) its value. */
typedef struct {
    uint32_t number;
    int wire_type;
    const unsigned char *data;
    Py_ssize_t len;
    uint64_t value;
} Field;

static int next_field_at(Reader *r, Field *f, int depth);

/* Past the fields of a group, to its END_GROUP (groups only appear as unknown fields here). */
static int skip_group(Reader *r, uint32_t number, int depth) {
    while (r->p < r->end) {
        const unsigned char *at = r->p;
        uint64_t tag;
        if (read_varint(r, &tag) < 0)
            return -1;
        if ((tag & 7) == 4)
            return (tag >> 3) == number ? 0 : -1;
        r->p = at;
        Field inner;
        if (next_field_at(r, &inner, depth) != 1)
            return -1;
    }
    return -1;
}

/* 1: a field was read, 0: end of message, -1: corrupt. */
static int next_field_at(Reader *r, Field *f, int depth) {
    if (r->p >= r->end)
        return 0;
    uint64_t tag;
    if (read_varint(r, &tag) < 0 || (tag >> 3) == 0 || (tag >> 3) > 0x1FFFFFFF)
        return -1;
    f->number = (uint32_t)(tag >> 3);
    f->wire_type = (int)(tag & 7);
    switch (f->wire_type) {
    case 0:
        return read_varint(r, &f->value) < 0 ? -1 : 1;
    case 1:
        if (r->end - r->p < 8)
            return -1;
        r->p += 8;
        return 1;
    case 2: {
        uint64_t n;
        if (read_varint(r, &n) < 0 || n > (uint64_t)(r->end - r->p))
            return -1;
        f->data = r->p;
        f->len = (Py_ssize_t)n;
        r->p += n;
        return 1;
    }
    case 3:
        return depth < 100 && skip_group(r, f->number, depth + 1) == 0 ? 1 : -1;
    case 5:
        if (r->end - r->p < 4)
            return -1;
        r->p += 4;
        return 1;
    default: /* 4, an END_GROUP without its start; 6 and 7 do not exist */
        return -1;
    }
}

static int next_field(Reader *r, Field *f) { return next_field_at(r, f, 0); }

static int valid_utf8(const unsigned char *s, Py_ssize_t n) {
    PyObject *u = PyUnicode_DecodeUTF8((const char *)s, n, "strict");
    if (u == NULL) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(u);
    return 1;
}

static int is_ascii(const unsigned char *s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] & 0x80)
            return 0;
    return 1;
}

/* -- streams and the connection --------------------------------------------------------------- */

typedef struct {
    uint32_t id;
    int active;         /* a handler (Python, or the ext_proc one here) still answers: h2grpc's `handler is not None` */
    int ext_proc;       /* the ext_proc method, answered here */
    PyObject *handler;  /* the Python StreamHandler, or NULL */
    int64_t send_window, recv_used;
    Buf buffer;         /* request bytes not yet a whole gRPC message */
    Buf pending;        /* DATA bytes waiting for window */
    int headers_sent, remote_closed;
    PyObject *closing;  /* the trailers block to send once `pending` is out */
    /* the ext_proc exchange (disagg.epp.ext_proc._Exchange) */
    int exchange, mode, routed;
    PyObject *path, *metadata;
    Buf body;
} Stream;

typedef struct {
    PyObject_HEAD
    PyObject *methods, *decode_head, *grpc_error, *report;
    PyObject *ext_proc_path, *route, *parse;  /* NULL: no ext_proc method here */
    PyObject *continues[N_CONTINUES];
    int default_mode;
    Py_ssize_t body_chunk, max_message;  /* a larger request message ends its stream: RESOURCE_EXHAUSTED */
    uint32_t request_body_field, response_body_field, streamed_path[3], body_field;
    PyObject *decoded;  /* header block -> (path, compressed), for blocks that leave the HPACK table as it was */
    Buf inbox, out;
    int preface_seen;
    Stream **streams;   /* open streams, by id (ids only grow: appended in order) */
    Py_ssize_t n_streams, streams_cap;
    uint32_t last_stream_id;
    int64_t peer_window, peer_initial_window, peer_max_frame, recv_used;
    int header_block_open, header_block_flags;
    uint32_t header_block_stream;
    Buf header_block;
    int goaway_sent, peer_gone, closing;
    /* the connection error being raised: code and message */
    int error_code;
    char error_message[256];
} Conn;

#define CONN_ERROR (-1) /* a protocol error: GOAWAY with error_code */
#define PY_ERROR (-2)   /* a Python exception is set: GOAWAY INTERNAL_ERROR */

static int conn_error(Conn *c, int code, const char *format, ...) {
    va_list args;
    va_start(args, format);
    c->error_code = code;
    vsnprintf(c->error_message, sizeof(c->error_message), format, args);
    va_end(args);
    return CONN_ERROR;
}

static Py_ssize_t find_stream(Conn *c, uint32_t id) {
    Py_ssize_t lo = 0, hi = c->n_streams;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (c->streams[mid]->id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < c->n_streams && c->streams[lo]->id == id ? lo : -1;
}

static Stream *get_stream(Conn *c, uint32_t id) {
    Py_ssize_t i = find_stream(c, id);
    return i < 0 ? NULL : c->streams[i];
}

static void free_stream(Stream *s) {
    Py_CLEAR(s->handler);
    Py_CLEAR(s->closing);
    Py_CLEAR(s->path);
    Py_CLEAR(s->metadata);
    buf_free(&s->buffer);
    buf_free(&s->pending);
    buf_free(&s->body);
    PyMem_Free(s);
}

static void pop_stream(Conn *c, uint32_t id) {
    Py_ssize_t i = find_stream(c, id);
    if (i < 0)
        return;
    Stream *s = c->streams[i];
    memmove(c->streams + i, c->streams + i + 1, (c->n_streams - i - 1) * sizeof(Stream *));
    c->n_streams--;
    free_stream(s);
}

static Stream *add_stream(Conn *c, uint32_t id) {
    if (c->n_streams == c->streams_cap) {
        Py_ssize_t cap = c->streams_cap ? c->streams_cap * 2 : 8;
        Stream **streams = PyMem_Realloc(c->streams, cap * sizeof(Stream *));
        if (streams == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        c->streams = streams;
        c->streams_cap = cap;
    }
    Stream *s = PyMem_Calloc(1, sizeof(Stream));
    if (s == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    s->id = id;
    s->send_window = c->peer_initial_window;
    c->streams[c->n_streams++] = s;
    return s;
}

static void clear_streams(Conn *c) {
    for (Py_ssize_t i = 0; i < c->n_streams; i++)
        free_stream(c->streams[i]);
    c->n_streams = 0;
}

static void close_when_idle(Conn *c) {
    if (c->n_streams == 0)
        c->closing = 1;
}

static int goaway(Conn *c, int code, const char *reason, Py_ssize_t reason_len) {
    if (c->goaway_sent)
        return 0;
    c->goaway_sent = 1;
    if (reason_len > 200)
        reason_len = 200;
    Buf p = {0};
    if (put_u32(&p, c->last_stream_id) < 0 || put_u32(&p, (uint32_t)code) < 0 || buf_put(&p, reason, reason_len) < 0) {
        buf_free(&p);
        return PY_ERROR;
    }
    int r = put_frame(&c->out, GOAWAY, 0, 0, p.data, p.len);
    buf_free(&p);
    return r < 0 ? PY_ERROR : 0;
}

/* -- writing ----------------------------------------------------------------------------------- */

/* Send what `stream.pending` holds as the windows allow; then its trailers, ending it. */
static int drain(Conn *c, Stream *s) {
    while (s->pending.len) {
        int64_t size = s->pending.len;
        if (s->send_window < size)
            size = s->send_window;
        if (c->peer_window < size)
            size = c->peer_window;
        if (c->peer_max_frame < size)
            size = c->peer_max_frame;
        if (size <= 0)
            return 0;
        if (put_frame(&c->out, DATA, 0, s->id, s->pending.data, size) < 0)
            return PY_ERROR;
        buf_consume(&s->pending, size);
        s->send_window -= size;
        c->peer_window -= size;
    }
    if (s->closing != NULL) {
        /* What the client still sends on this stream is dropped (its window refilled). */
        if (put_frame(&c->out, HEADERS, END_HEADERS | END_STREAM, s->id, PyBytes_AS_STRING(s->closing),
                      PyBytes_GET_SIZE(s->closing)) < 0)
            return PY_ERROR;
        pop_stream(c, s->id);
        if (c->peer_gone || c->goaway_sent)
            close_when_idle(c);
    }
    return 0;
}

static int drain_all(Conn *c) {
    /* drain() may remove the stream it drains: walk a copy of the ids. */
    Py_ssize_t n = c->n_streams;
    if (n == 0)
        return 0;
    uint32_t *ids = PyMem_Malloc(n * sizeof(uint32_t));
    if (ids == NULL) {
        PyErr_NoMemory();
        return PY_ERROR;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        ids[i] = c->streams[i]->id;
    int r = 0;
    for (Py_ssize_t i = 0; i < n && r == 0; i++) {
        Stream *s = get_stream(c, ids[i]);
        if (s != NULL)
            r = drain(c, s);
    }
    PyMem_Free(ids);
    return r;
}

static int send_data(Conn *c, Stream *s, const char *data, Py_ssize_t n) {
    if (!s->headers_sent) {
        Buf h = {0};
        int r = response_headers(&h) < 0 ? -1 : put_frame(&c->out, HEADERS, END_HEADERS, s->id, h.data, h.len);
        buf_free(&h);
        if (r < 0)
            return PY_ERROR;
        s->headers_sent = 1;
    }
    if (buf_put(&s->pending, data, n) < 0)
        return PY_ERROR;
    return drain(c, s);
}

/* End the stream with this status once its queued data is out; drop what the client still sends. */
static int finish(Conn *c, Stream *s, int code, const char *message, Py_ssize_t message_len) {
    if (s->closing != NULL)
        return 0;
    s->closing = trailers(code, message, message_len, !s->headers_sent);
    if (s->closing == NULL)
        return PY_ERROR;
    s->headers_sent = 1;
    s->active = 0;
    Py_CLEAR(s->handler);
    return drain(c, s);
}

static int finish_str(Conn *c, Stream *s, int code, const char *message) {
    return finish(c, s, code, message, (Py_ssize_t)strlen(message));
}

/* The stream's handler raised: GrpcError ends it with that status, anything else with INTERNAL. */
static int finish_with_exception(Conn *c, Stream *s) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(tb);
        return finish_str(c, s, GRPC_INTERNAL, "unknown error");
    }
    int code = GRPC_INTERNAL;
    PyObject *text = NULL;
    if (PyObject_IsInstance(value, c->grpc_error) == 1) {
        PyObject *code_obj = PyObject_GetAttrString(value, "code");
        text = PyObject_GetAttrString(value, "message");
        if (code_obj != NULL)
            code = (int)PyLong_AsLong(code_obj);
        Py_XDECREF(code_obj);
    } else {
        PyObject *result = PyObject_CallFunction(c->report, "Os", value, "gRPC handler failed");
        if (result == NULL)
            PyErr_Clear();
        Py_XDECREF(result);
        PyObject *name = PyType_GetName(Py_TYPE(value));
        text = name == NULL ? NULL : PyUnicode_FromFormat("%U: %S", name, value);
        Py_XDECREF(name);
    }
    Py_DECREF(type);
    Py_DECREF(value);
    Py_XDECREF(tb);
    if (PyErr_Occurred() || text == NULL || !PyUnicode_Check(text)) {
        PyErr_Clear();
        Py_XDECREF(text);
        return finish_str(c, s, code, "handler failed");
    }
    Py_ssize_t n;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &n);
    int r = utf8 == NULL ? PY_ERROR : finish(c, s, code, utf8, n);
    Py_DECREF(text);
    return r;
}

/* -- the ext_proc method (disagg.epp.ext_proc.ExternalProcessor.answer, in C) ------------------ */

static int put_varint(Buf *b, uint64_t v) {
    while (v >= 0x80) {
        if (buf_byte(b, (unsigned char)(v | 0x80)) < 0)
            return -1;
        v >>= 7;
    }
    return buf_byte(b, (unsigned char)v);
}

static Py_ssize_t varint_size(uint64_t v) {
    Py_ssize_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* A gRPC-framed ProcessingResponse handing a body chunk back to Envoy (FULL_DUPLEX_STREAMED):
 * field `phase` {response {body_mutation {streamed_response {body, end_of_stream}}}}, as
 * disagg.epp.ext_proc.streamed_body writes it. */
static int put_streamed_body(Conn *c, Buf *out, uint32_t phase, const char *chunk, Py_ssize_t n, int end_of_stream) {
    uint32_t numbers[4] = {phase, c->streamed_path[0], c->streamed_path[1], c->streamed_path[2]};
    Py_ssize_t sizes[4]; /* the payload of field numbers[i]; the innermost is the body and end_of_stream */
    sizes[3] = (n ? varint_size((uint64_t)c->body_field << 3 | 2) + varint_size((uint64_t)n) + n : 0) +
               (end_of_stream ? 2 : 0);
    for (int i = 2; i >= 0; i--)
        sizes[i] = varint_size((uint64_t)numbers[i + 1] << 3 | 2) + varint_size((uint64_t)sizes[i + 1]) + sizes[i + 1];
    /* sizes[0] is the payload of the phase field; the message adds its tag and length. */
    Py_ssize_t total = varint_size((uint64_t)phase << 3 | 2) + varint_size((uint64_t)sizes[0]) + sizes[0];
    if (buf_byte(out, 0) < 0 || put_u32(out, (uint32_t)total) < 0)
        return -1;
    for (int i = 0; i < 4; i++)
        if (put_varint(out, (uint64_t)numbers[i] << 3 | 2) < 0 || put_varint(out, (uint64_t)sizes[i]) < 0)
            return -1;
    if (n && (put_varint(out, (uint64_t)c->body_field << 3 | 2) < 0 || put_varint(out, (uint64_t)n) < 0 ||
              buf_put(out, chunk, n) < 0))
        return -1;
    if (end_of_stream) {
        unsigned char eos[2] = {2 << 3, 1}; /* StreamedBodyResponse.end_of_stream (field 2) = true */
        if (buf_put(out, eos, 2) < 0)
            return -1;
    }
    return 0;
}

static int put_continue(Conn *c, Buf *out, int which) {
    PyObject *b = c->continues[which];
    return put_grpc_frame(out, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b)) < 0 ? PY_ERROR : 0;
}

/* Pick (the Python call) and answer: the routed headers, or the refusal, plus the body echoed
 * back in FULL_DUPLEX_STREAMED. `headers_phase`: the request ended with its headers. */
static int route(Conn *c, Stream *s, Buf *out, int headers_phase) {
    s->routed = 1;
    int as_headers = headers_phase || s->mode == MODE_FULL_DUPLEX;
    PyObject *body = PyBytes_FromStringAndSize(s->body.data, s->body.len);
    if (body == NULL)
        return PY_ERROR;
    PyObject *result = PyObject_CallFunctionObjArgs(c->route, s->path, body, s->metadata ? s->metadata : Py_None,
                                                    as_headers ? Py_True : Py_False, NULL);
    Py_DECREF(body);
    if (result == NULL)
        return PY_ERROR;
    PyObject *answer;
    int routed;
    if (!PyArg_ParseTuple(result, "Sp", &answer, &routed)) {
        Py_DECREF(result);
        return PY_ERROR;
    }
    int r = put_grpc_frame(out, PyBytes_AS_STRING(answer), PyBytes_GET_SIZE(answer));
    Py_DECREF(result);
    if (r < 0)
        return PY_ERROR;
    if (!routed || headers_phase || s->mode != MODE_FULL_DUPLEX)
        return 0;
    if (s->body.len == 0)
        return put_streamed_body(c, out, c->request_body_field, NULL, 0, 1) < 0 ? PY_ERROR : 0;
    for (Py_ssize_t at = 0; at < s->body.len; at += c->body_chunk) {
        Py_ssize_t n = s->body.len - at < c->body_chunk ? s->body.len - at : c->body_chunk;
        if (put_streamed_body(c, out, c->request_body_field, s->body.data + at, n, at + n >= s->body.len) < 0)
            return PY_ERROR;
    }
    return 0;
}

/* What a ProcessingRequest carries that the answer depends on. */
typedef struct {
    int phase;                  /* the oneof field set last (0: none) */
    Field phase_parts[8];       /* its occurrences since it was last switched to (merged) */
    int n_phase_parts;
    int has_protocol_config;
    uint64_t request_body_mode;
    Buf metadata;               /* every metadata_context occurrence, concatenated (protobuf merges them) */
    int has_metadata;
    int unread;                 /* it holds fields protobuf checks and this reader skips: let protobuf check */
} Request;

/* 0, -1 when the wire format is corrupt (or too unusual to merge here), PY_ERROR out of memory. */
static int read_request(const unsigned char *m, Py_ssize_t n, Request *q) {
    Reader r = {m, m + n};
    Field f;
    int got;
    while ((got = next_field(&r, &f)) == 1) {
        if (f.wire_type != 2)
            continue; /* unknown to us: a field of this number with another wire type is kept aside by protobuf */
        if (f.number >= REQ_HEADERS && f.number <= RESP_TRAILERS) {
            if ((int)f.number != q->phase) {
                q->phase = (int)f.number;
                q->n_phase_parts = 0;
            }
            if (q->n_phase_parts == 8)
                return -1;
            q->phase_parts[q->n_phase_parts++] = f;
        } else if (f.number == REQ_METADATA || f.number == 9) { /* 9: attributes */
            q->unread = 1;
            if (f.number == 9)
                continue;
            q->has_metadata = 1;
            if (buf_put(&q->metadata, f.data, f.len) < 0)
                return PY_ERROR;
        } else if (f.number == REQ_PROTOCOL_CONFIG) {
            q->has_protocol_config = 1;
            Reader pr = {f.data, f.data + f.len};
            Field pf;
            int pgot;
            while ((pgot = next_field(&pr, &pf)) == 1)
                if (pf.number == 1 && pf.wire_type == 0)
                    q->request_body_mode = pf.value;
            if (pgot < 0)
                return -1;
        }
    }
    if (q->phase == RESP_HEADERS || q->phase == REQ_TRAILERS || q->phase == RESP_TRAILERS)
        q->unread = 1; /* header maps this reader does not read */
    return got < 0 ? -1 : 0;
}

/* HttpHeaders: the first `:path` header (raw_value when set, else value) and end_of_stream. */
static int read_headers(Request *q, PyObject **path, int *end_of_stream) {
    for (int i = 0; i < q->n_phase_parts; i++) {
        Reader hr = {q->phase_parts[i].data, q->phase_parts[i].data + q->phase_parts[i].len};
        Field hf;
        int got;
        while ((got = next_field(&hr, &hf)) == 1) {
            if (hf.number == 3 && hf.wire_type == 0) {
                *end_of_stream = hf.value != 0;
            } else if (hf.number == 2 && hf.wire_type == 2) { /* attributes */
                q->unread = 1;
            } else if (hf.number == 1 && hf.wire_type == 2) { /* HeaderMap */
                Reader mr = {hf.data, hf.data + hf.len};
                Field mf;
                int mgot;
                while ((mgot = next_field(&mr, &mf)) == 1) {
                    if (mf.number != 1 || mf.wire_type != 2)
                        continue;
                    /* HeaderValue: key (string), value (string), raw_value (bytes); the last of each wins */
                    Reader vr = {mf.data, mf.data + mf.len};
                    Field vf, key = {0}, value = {0}, raw = {0};
                    int vgot;
                    while ((vgot = next_field(&vr, &vf)) == 1) {
                        if (vf.wire_type != 2)
                            continue;
                        if (vf.number == 1)
                            key = vf;
                        else if (vf.number == 2)
                            value = vf;
                        else if (vf.number == 3)
                            raw = vf;
                    }
                    if (vgot < 0)
                        return -1;
                    /* strings must be UTF-8, as protobuf checks when it parses */
                    if ((key.len && !is_ascii(key.data, key.len) && !valid_utf8(key.data, key.len)) ||
                        (value.len && !is_ascii(value.data, value.len) && !valid_utf8(value.data, value.len)))
                        return -1;
                    if (*path == NULL && key.len == 5 && memcmp(key.data, ":path", 5) == 0) {
                        *path = raw.len ? PyUnicode_DecodeUTF8((const char *)raw.data, raw.len, "replace")
                                        : PyUnicode_DecodeUTF8((const char *)value.data, value.len, "strict");
                        if (*path == NULL)
                            return PY_ERROR;
                    }
                }
                if (mgot < 0)
                    return -1;
            }
        }
        if (got < 0)
            return -1;
    }
    return 0;
}

/* HttpBody: body (the last occurrence wins) and end_of_stream. */
static int read_body(Request *q, const unsigned char **body, Py_ssize_t *body_len, int *end_of_stream) {
    *body = NULL;
    *body_len = 0;
    for (int i = 0; i < q->n_phase_parts; i++) {
        Reader br = {q->phase_parts[i].data, q->phase_parts[i].data + q->phase_parts[i].len};
        Field bf;
        int got;
        while ((got = next_field(&br, &bf)) == 1) {
            if (bf.number == 1 && bf.wire_type == 2) {
                *body = bf.data;
                *body_len = bf.len;
            } else if (bf.number == 2 && bf.wire_type == 0) {
                *end_of_stream = bf.value != 0;
            }
        }
        if (got < 0)
            return -1;
    }
    return 0;
}

/* One ext_proc message in; its answers (gRPC-framed) appended to `out`. Returns 0, -1 for a
 * message that does not parse, PY_ERROR with a Python exception set. */
static int ext_proc_message(Conn *c, Stream *s, const unsigned char *m, Py_ssize_t n, Buf *out) {
    Request q = {0};
    int r = read_request(m, n, &q);
    int end_of_stream = 0;
    PyObject *path = NULL;
    if (r < 0 || (q.phase == REQ_HEADERS && (r = read_headers(&q, &path, &end_of_stream)) < 0)) {
        buf_free(&q.metadata);
        return r;
    }
    if (q.unread) {
        /* Rare (Envoy sends these only when configured to): protobuf parses the message, and a
         * message it refuses fails the stream as in the Python engine. */
        PyObject *payload = PyBytes_FromStringAndSize((const char *)m, n);
        PyObject *parsed = payload == NULL ? NULL : PyObject_CallOneArg(c->parse, payload);
        Py_XDECREF(payload);
        if (parsed == NULL) {
            Py_XDECREF(path);
            buf_free(&q.metadata);
            return PY_ERROR;
        }
        Py_DECREF(parsed);
    }
    switch (q.phase) {
    case REQ_HEADERS: {
        /* a new exchange */
        s->exchange = 1;
        s->routed = 0;
        s->body.len = 0;
        s->mode = q.has_protocol_config ? (int)q.request_body_mode : c->default_mode;
        Py_XSETREF(s->path, path != NULL ? path : PyUnicode_FromString("/"));
        Py_CLEAR(s->metadata);
        if (s->path == NULL) {
            r = PY_ERROR;
            break;
        }
        if (q.has_metadata && q.metadata.len) {
            s->metadata = PyBytes_FromStringAndSize(q.metadata.data, q.metadata.len);
            if (s->metadata == NULL) {
                r = PY_ERROR;
                break;
            }
        }
        if (end_of_stream)
            r = route(c, s, out, 1);
        else if (s->mode != MODE_FULL_DUPLEX)
            r = put_continue(c, out, C_REQ_HEADERS);
        break;
    }
    case REQ_BODY: {
        const unsigned char *body;
        Py_ssize_t body_len;
        r = read_body(&q, &body, &body_len, &end_of_stream);
        if (r < 0 || !s->exchange)
            break;
        if (buf_put(&s->body, body, body_len) < 0) {
            r = PY_ERROR;
            break;
        }
        if (end_of_stream)
            r = route(c, s, out, 0);
        else if (s->mode != MODE_FULL_DUPLEX && s->mode != MODE_BUFFERED)
            r = put_continue(c, out, C_REQ_BODY);
        break;
    }
    case REQ_TRAILERS:
        if (s->exchange && !s->routed)
            r = route(c, s, out, 0);
        if (r == 0)
            r = put_continue(c, out, C_REQ_TRAILERS);
        break;
    case RESP_HEADERS:
        r = put_continue(c, out, C_RESP_HEADERS);
        break;
    case RESP_BODY: {
        const unsigned char *body;
        Py_ssize_t body_len;
        r = read_body(&q, &body, &body_len, &end_of_stream);
        if (r < 0)
            break;
        if (s->exchange && s->mode == MODE_FULL_DUPLEX)
            r = put_streamed_body(c, out, c->response_body_field, (const char *)body, body_len, end_of_stream) < 0
                    ? PY_ERROR : 0;
        else
            r = put_continue(c, out, C_RESP_BODY);
        break;
    }
    case RESP_TRAILERS:
        r = put_continue(c, out, C_RESP_TRAILERS);
        break;
    default:
        break;
    }
    buf_free(&q.metadata);
    return r;
}

/* -- reading ----------------------------------------------------------------------------------- */

/* Run the stream's handler on one message (`m`; NULL: the client's end of stream) and send its
 * answers. `*ended`: the stream has ended (an error, or the handler finished) and is gone. */
static int call_handler(Conn *c, Stream *s, const unsigned char *m, Py_ssize_t n, int *ended) {
    *ended = 0;
    if (s->ext_proc) {
        Buf out = {0};
        int r = m != NULL ? ext_proc_message(c, s, m, n, &out) : 0;
        if (r == -1) {
            /* Protobuf's own parser names the problem (and fails the stream as the Python engine does). */
            buf_free(&out);
            *ended = 1;
            PyObject *payload = PyBytes_FromStringAndSize((const char *)m, n);
            PyObject *parsed = payload == NULL ? NULL : PyObject_CallOneArg(c->parse, payload);
            Py_XDECREF(payload);
            if (parsed == NULL)
                return finish_with_exception(c, s);
            Py_DECREF(parsed);
            return finish_str(c, s, GRPC_INTERNAL, "DecodeError: a ProcessingRequest this server cannot read");
        }
        if (r == PY_ERROR) {
            buf_free(&out);
            *ended = 1;
            return finish_with_exception(c, s);
        }
        if (out.len && send_data(c, s, out.data, out.len) < 0) {
            buf_free(&out);
            return PY_ERROR;
        }
        buf_free(&out);
        if (s->routed) {
            *ended = 1;
            return finish(c, s, GRPC_OK, NULL, 0);
        }
        return 0;
    }
    PyObject *responses;
    if (m != NULL) {
        PyObject *payload = PyBytes_FromStringAndSize((const char *)m, n);
        if (payload == NULL)
            return PY_ERROR;
        responses = PyObject_CallMethod(s->handler, "message", "O", payload);
        Py_DECREF(payload);
    } else {
        responses = PyObject_CallMethod(s->handler, "end", NULL);
    }
    if (responses == NULL) {
        *ended = 1;
        return finish_with_exception(c, s);
    }
    int truth = PyObject_IsTrue(responses);
    if (truth == 1) { /* all of them in one DATA frame when the windows allow */
        Buf out = {0};
        PyObject *it = PyObject_GetIter(responses), *item;
        int failed = it == NULL;
        while (!failed && (item = PyIter_Next(it)) != NULL) {
            char *data;
            Py_ssize_t size;
            failed = PyBytes_AsStringAndSize(item, &data, &size) < 0 || put_grpc_frame(&out, data, size) < 0;
            Py_DECREF(item);
        }
        Py_XDECREF(it);
        failed = failed || PyErr_Occurred();
        Py_DECREF(responses);
        if (failed) {
            buf_free(&out);
            *ended = 1;
            return finish_with_exception(c, s);
        }
        int r = send_data(c, s, out.data, out.len);
        buf_free(&out);
        if (r < 0)
            return r;
    } else {
        Py_DECREF(responses);
        if (truth < 0) {
            *ended = 1;
            return finish_with_exception(c, s);
        }
    }
    if (s->handler != NULL) {
        PyObject *finished = PyObject_GetAttrString(s->handler, "finished");
        int done = finished == NULL ? -1 : PyObject_IsTrue(finished);
        Py_XDECREF(finished);
        if (done < 0) {
            *ended = 1;
            return finish_with_exception(c, s);
        }
        if (done) {
            *ended = 1;
            return finish(c, s, GRPC_OK, NULL, 0);
        }
    }
    return 0;
}

static int remote_end(Conn *c, Stream *s) {
    s->remote_closed = 1;
    if (s->closing != NULL || !s->active)
        return 0;
    if (s->buffer.len)
        return finish_str(c, s, GRPC_INTERNAL, "stream ended inside a message");
    int ended;
    uint32_t id = s->id;
    int r = call_handler(c, s, NULL, 0, &ended);
    if (r < 0 || ended)
        return r;
    s = get_stream(c, id);
    return s == NULL ? 0 : finish(c, s, GRPC_OK, NULL, 0);
}

static int put_window_update(Buf *out, uint32_t stream_id, int64_t increment) {
    unsigned char p[4] = {increment >> 24, increment >> 16, increment >> 8, increment};
    return put_frame(out, WINDOW_UPDATE, 0, stream_id, p, 4);
}

/* Account received DATA against our windows; top them up when half used. */
static int refill(Conn *c, Py_ssize_t size, Stream *s, uint32_t stream_id) {
    c->recv_used += size;
    if (c->recv_used >= WINDOW_REFILL_AT) {
        if (put_window_update(&c->out, 0, c->recv_used) < 0)
            return PY_ERROR;
        c->recv_used = 0;
    }
    if (s != NULL) {
        s->recv_used += size;
        if (s->recv_used >= WINDOW_REFILL_AT) {
            if (put_window_update(&c->out, stream_id, s->recv_used) < 0)
                return PY_ERROR;
            s->recv_used = 0;
        }
    }
    return 0;
}

static int unpad(Conn *c, int flags, const unsigned char **p, Py_ssize_t *n) {
    if (!(flags & PADDED))
        return 0;
    if (*n == 0)
        return conn_error(c, PROTOCOL_ERROR, "padded frame without pad length");
    Py_ssize_t pad = (*p)[0];
    if (pad >= *n)
        return conn_error(c, PROTOCOL_ERROR, "padding longer than the frame");
    *p += 1;
    *n -= 1 + pad;
    return 0;
}

static int on_data(Conn *c, int flags, uint32_t stream_id, const unsigned char *p, Py_ssize_t n) {
    Stream *s = get_stream(c, stream_id);
    if (refill(c, n, s, stream_id) < 0)
        return PY_ERROR;
    if (s == NULL || s->remote_closed)
        return 0; /* closed or reset here: the bytes still count against the windows (refilled) */
    int r = unpad(c, flags, &p, &n);
    if (r < 0)
        return r;
    if (s->active) {
        Buf *buffer = &s->buffer;
        /* Whole messages straight from the frame when nothing is buffered (the usual case). */
        const unsigned char *at = p, *end = p + n;
        while (1) {
            const unsigned char *head;
            Py_ssize_t available;
            if (buffer->len) {
                if (buf_put(buffer, at, end - at) < 0)
                    return PY_ERROR;
                at = end;
                head = (const unsigned char *)buffer->data;
                available = buffer->len;
            } else {
                head = at;
                available = end - at;
            }
            if (available < 5)
                break;
            if (head[0] != 0)
                return finish_str(c, s, GRPC_UNIMPLEMENTED, "compressed messages are not supported");
            uint32_t size = (uint32_t)head[1] << 24 | (uint32_t)head[2] << 16 | (uint32_t)head[3] << 8 | head[4];
            if (size > c->max_message) {
                char message[80];
                snprintf(message, sizeof(message), "message of %u bytes (limit %zd)", size, c->max_message);
                return finish_str(c, s, GRPC_RESOURCE_EXHAUSTED, message);
            }
            if (available < 5 + (Py_ssize_t)size)
                break;
            int ended;
            if (buffer->len) {
                /* copy out: the handler may run long, and the buffer moves on */
                Buf message = {0};
                if (buf_put(&message, head + 5, size) < 0)
                    return PY_ERROR;
                buf_consume(buffer, 5 + size);
                r = call_handler(c, s, (const unsigned char *)message.data, size, &ended);
                buf_free(&message);
            } else {
                at += 5 + size;
                r = call_handler(c, s, head + 5, size, &ended);
            }
            if (r < 0)
                return r;
            if (ended)
                return 0;
        }
        if (at < end && buf_put(buffer, at, end - at) < 0)
            return PY_ERROR;
    }
    if (flags & END_STREAM)
        return remote_end(c, s);
    return 0;
}

static int on_header_block(Conn *c) {
    uint32_t stream_id = c->header_block_stream;
    int flags = c->header_block_flags;
    c->header_block_open = 0;
    PyObject *block = PyBytes_FromStringAndSize(c->header_block.data, c->header_block.len);
    c->header_block.len = 0;
    if (block == NULL)
        return PY_ERROR;
    /* (path, compressed): remembered for a block that leaves the HPACK table as it was */
    PyObject *head = PyDict_GetItemWithError(c->decoded, block);
    if (head != NULL) {
        Py_INCREF(head);
    } else {
        if (PyErr_Occurred()) {
            Py_DECREF(block);
            return PY_ERROR;
        }
        PyObject *decoded = PyObject_CallFunctionObjArgs(c->decode_head, block, NULL);
        if (decoded == NULL) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            PyObject *text = value ? PyObject_Str(value) : NULL;
            const char *utf8 = text ? PyUnicode_AsUTF8(text) : NULL;
            if (utf8 == NULL)
                PyErr_Clear();
            conn_error(c, COMPRESSION_ERROR, "cannot decode headers: %s", utf8 ? utf8 : "?");
            Py_XDECREF(text);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            Py_DECREF(block);
            return CONN_ERROR;
        }
        PyObject *path, *compressed;
        int keeps;
        if (!PyArg_ParseTuple(decoded, "UOp", &path, &compressed, &keeps)) {
            Py_DECREF(decoded);
            Py_DECREF(block);
            return PY_ERROR;
        }
        head = PyTuple_Pack(2, path, compressed);
        Py_DECREF(decoded);
        if (head == NULL) {
            Py_DECREF(block);
            return PY_ERROR;
        }
        if (keeps) {
            if (PyDict_GET_SIZE(c->decoded) >= 64)
                PyDict_Clear(c->decoded);
            if (PyDict_SetItem(c->decoded, block, head) < 0) {
                Py_DECREF(head);
                Py_DECREF(block);
                return PY_ERROR;
            }
        } else {
            PyDict_Clear(c->decoded); /* the table changed: what was remembered may decode differently now */
        }
    }
    Py_DECREF(block);
    PyObject *path = PyTuple_GET_ITEM(head, 0);
    int compressed = PyObject_IsTrue(PyTuple_GET_ITEM(head, 1));
    int r = 0;
    Stream *s = get_stream(c, stream_id);
    if (s != NULL) { /* trailers from the client */
        if (flags & END_STREAM)
            r = remote_end(c, s);
        goto done;
    }
    if (stream_id <= c->last_stream_id || stream_id % 2 == 0)
        goto done; /* a stream we already closed (or refused): drop what it still sends */
    c->last_stream_id = stream_id;
    if (c->goaway_sent || c->n_streams >= MAX_STREAMS) {
        unsigned char code[4] = {0, 0, 0, REFUSED_STREAM};
        r = put_frame(&c->out, RST_STREAM, 0, stream_id, code, 4) < 0 ? PY_ERROR : 0;
        goto done;
    }
    int ext_proc = c->ext_proc_path != NULL && PyUnicode_Compare(path, c->ext_proc_path) == 0;
    PyObject *method = NULL;
    if (!ext_proc) {
        method = PyDict_GetItemWithError(c->methods, path);
        if (method == NULL && PyErr_Occurred()) {
            r = PY_ERROR;
            goto done;
        }
    }
    s = add_stream(c, stream_id);
    if (s == NULL) {
        r = PY_ERROR;
        goto done;
    }
    if (!ext_proc && method == NULL) {
        PyObject *message = PyUnicode_FromFormat("unknown method %U", path);
        Py_ssize_t n;
        const char *utf8 = message ? PyUnicode_AsUTF8AndSize(message, &n) : NULL;
        r = utf8 == NULL ? PY_ERROR : finish(c, s, GRPC_UNIMPLEMENTED, utf8, n);
        Py_XDECREF(message);
        goto done;
    }
    if (compressed) {
        r = finish_str(c, s, GRPC_UNIMPLEMENTED, "compressed messages are not supported");
        goto done;
    }
    if (ext_proc) {
        s->ext_proc = 1;
    } else {
        s->handler = PyObject_CallNoArgs(method);
        if (s->handler == NULL) {
            r = PY_ERROR;
            goto done;
        }
    }
    s->active = 1;
    if (flags & END_STREAM)
        r = remote_end(c, s);
done:
    Py_DECREF(head);
    return r;
}

static int on_settings(Conn *c, const unsigned char *p, Py_ssize_t n) {
    if (n % 6)
        return conn_error(c, FRAME_SIZE_ERROR, "SETTINGS length");
    for (Py_ssize_t i = 0; i < n; i += 6) {
        int key = p[i] << 8 | p[i + 1];
        int64_t value = (int64_t)p[i + 2] << 24 | p[i + 3] << 16 | p[i + 4] << 8 | p[i + 5];
        if (key == SETTINGS_INITIAL_WINDOW_SIZE) {
            if (value > MAX_WINDOW)
                return conn_error(c, FLOW_CONTROL_ERROR, "initial window too large");
            int64_t delta = value - c->peer_initial_window;
            c->peer_initial_window = value;
            for (Py_ssize_t j = 0; j < c->n_streams; j++)
                c->streams[j]->send_window += delta;
        } else if (key == SETTINGS_MAX_FRAME_SIZE) {
            if (value < DEFAULT_FRAME_SIZE || value > (1 << 24) - 1)
                return conn_error(c, PROTOCOL_ERROR, "max frame size out of range");
            c->peer_max_frame = value;
        }
    }
    if (put_frame(&c->out, SETTINGS, ACK, 0, NULL, 0) < 0)
        return PY_ERROR;
    return drain_all(c);
}

static int on_frame(Conn *c, int kind, int flags, uint32_t stream_id, const unsigned char *p, Py_ssize_t n) {
    if (c->header_block_open && kind != CONTINUATION)
        return conn_error(c, PROTOCOL_ERROR, "header block interrupted");
    int r;
    switch (kind) {
    case DATA:
        return on_data(c, flags, stream_id, p, n);
    case HEADERS:
        if (stream_id == 0)
            return conn_error(c, PROTOCOL_ERROR, "HEADERS on stream 0");
        if ((r = unpad(c, flags, &p, &n)) < 0)
            return r;
        if (flags & PRIORITY_FLAG) {
            Py_ssize_t skip = n < 5 ? n : 5;
            p += skip;
            n -= skip;
        }
        c->header_block_open = 1;
        c->header_block_stream = stream_id;
        c->header_block_flags = flags;
        c->header_block.len = 0;
        if (buf_put(&c->header_block, p, n) < 0)
            return PY_ERROR;
        return flags & END_HEADERS ? on_header_block(c) : 0;
    case CONTINUATION:
        if (!c->header_block_open || c->header_block_stream != stream_id)
            return conn_error(c, PROTOCOL_ERROR, "unexpected CONTINUATION");
        if (buf_put(&c->header_block, p, n) < 0)
            return PY_ERROR;
        if (c->header_block.len > MAX_HEADER_BLOCK)
            return conn_error(c, ENHANCE_YOUR_CALM, "header block too large");
        return flags & END_HEADERS ? on_header_block(c) : 0;
    case SETTINGS:
        return flags & ACK ? 0 : on_settings(c, p, n);
    case PING:
        if (!(flags & ACK) && put_frame(&c->out, PING, ACK, 0, p, n) < 0)
            return PY_ERROR;
        return 0;
    case WINDOW_UPDATE: {
        uint32_t increment = 0;
        for (Py_ssize_t i = 0; i < n; i++)
            increment = increment << 8 | p[i];
        increment &= 0x7FFFFFFF;
        if (stream_id == 0) {
            c->peer_window += increment;
            return drain_all(c);
        }
        Stream *s = get_stream(c, stream_id);
        if (s == NULL)
            return 0;
        s->send_window += increment;
        return drain(c, s);
    }
    case RST_STREAM:
        pop_stream(c, stream_id);
        return 0;
    case GOAWAY:
        c->peer_gone = 1;
        close_when_idle(c);
        return 0;
    case PUSH_PROMISE:
        return conn_error(c, PROTOCOL_ERROR, "PUSH_PROMISE from a client");
    default: /* PRIORITY and unknown frame types are ignored, as the RFC requires */
        return 0;
    }
}

/* Handle the complete frames in `data`; how many bytes they took, or an error. */
static Py_ssize_t read_frames(Conn *c, const unsigned char *data, Py_ssize_t end) {
    Py_ssize_t pos = 0;
    if (!c->preface_seen) {
        if (end < PREFACE_LEN) {
            if (memcmp(data, PREFACE, end) != 0)
                return conn_error(c, PROTOCOL_ERROR, "not an HTTP/2 connection preface");
            return 0;
        }
        if (memcmp(data, PREFACE, PREFACE_LEN) != 0)
            return conn_error(c, PROTOCOL_ERROR, "not an HTTP/2 connection preface");
        c->preface_seen = 1;
        pos = PREFACE_LEN;
    }
    while (end - pos >= 9) {
        const unsigned char *h = data + pos;
        Py_ssize_t length = h[0] << 16 | h[1] << 8 | h[2];
        int kind = h[3], flags = h[4];
        uint32_t stream_id = ((uint32_t)h[5] << 24 | h[6] << 16 | h[7] << 8 | h[8]) & 0x7FFFFFFF;
        if (length > DEFAULT_FRAME_SIZE)
            return conn_error(c, FRAME_SIZE_ERROR, "frame of %zd bytes", length);
        if (end - pos - 9 < length)
            break;
        pos += 9 + length;
        int r = on_frame(c, kind, flags, stream_id, h + 9, length);
        if (r < 0)
            return r;
    }
    return pos;
}

/* -- the Python type ---------------------------------------------------------------------------- */

static PyObject *take_out(Conn *c) {
    PyObject *out = PyBytes_FromStringAndSize(c->out.data, c->out.len);
    c->out.len = 0;
    return out;
}

/* A connection error (or a bug): GOAWAY, report it, and close once the output is written. */
static void fail_connection(Conn *c, int r) {
    if (r == CONN_ERROR) {
        PyObject *result, *text = PyUnicode_FromFormat("gRPC connection error %d: %s", c->error_code, c->error_message);
        if (text != NULL) {
            result = PyObject_CallFunctionObjArgs(c->report, Py_None, text, NULL);
            Py_XDECREF(result);
            Py_DECREF(text);
        }
        PyErr_Clear();
        goaway(c, c->error_code, c->error_message, (Py_ssize_t)strlen(c->error_message));
    } else {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        PyObject *text = value ? PyObject_Str(value) : NULL;
        Py_ssize_t n = 0;
        const char *utf8 = text ? PyUnicode_AsUTF8AndSize(text, &n) : NULL;
        if (utf8 == NULL) {
            PyErr_Clear();
            utf8 = "";
            n = 0;
        }
        if (value != NULL) {
            PyObject *result = PyObject_CallFunction(c->report, "Os", value, "gRPC connection failed");
            Py_XDECREF(result);
            PyErr_Clear();
        }
        goaway(c, INTERNAL_ERROR, utf8, n);
        Py_XDECREF(text);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    }
    PyErr_Clear();
    c->closing = 1;
}

static PyObject *Conn_feed(Conn *c, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *data = view.buf;
    Py_ssize_t n = view.len;
    if (c->inbox.len) {
        if (buf_put(&c->inbox, data, n) < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
        data = (const unsigned char *)c->inbox.data;
        n = c->inbox.len;
    }
    Py_ssize_t used = read_frames(c, data, n);
    if (used < 0) {
        fail_connection(c, (int)used);
        c->inbox.len = 0;
    } else if (data == (const unsigned char *)c->inbox.data) {
        buf_consume(&c->inbox, used);
    } else if (used < n && buf_put(&c->inbox, data + used, n - used) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyBuffer_Release(&view);
    return take_out(c);
}

static PyObject *Conn_opening(Conn *c, PyObject *unused) {
    unsigned char settings[18] = {
        0, SETTINGS_MAX_CONCURRENT_STREAMS, 0, 0, MAX_STREAMS >> 8, MAX_STREAMS & 0xFF,
        0, SETTINGS_INITIAL_WINDOW_SIZE, 0x7F, 0xFF, 0xFF, 0xFF,
        0, SETTINGS_HEADER_TABLE_SIZE, 0, 0, 4096 >> 8, 4096 & 0xFF,
    };
    if (put_frame(&c->out, SETTINGS, 0, 0, settings, sizeof(settings)) < 0 ||
        put_window_update(&c->out, 0, MAX_WINDOW - DEFAULT_WINDOW) < 0)
        return NULL;
    return take_out(c);
}

static PyObject *Conn_shut_down(Conn *c, PyObject *unused) {
    if (goaway(c, NO_ERROR, "", 0) < 0)
        return NULL;
    close_when_idle(c);
    return take_out(c);
}

static PyObject *Conn_lost(Conn *c, PyObject *unused) {
    clear_streams(c);
    Py_RETURN_NONE;
}

static PyMethodDef Conn_methods[] = {
    {"opening", (PyCFunction)Conn_opening, METH_NOARGS, "The server's first bytes: SETTINGS and a window update."},
    {"feed", (PyCFunction)Conn_feed, METH_O, "Bytes from the client in; the bytes to write back."},
    {"shut_down", (PyCFunction)Conn_shut_down, METH_NOARGS, "GOAWAY: no new streams; `closing` once idle."},
    {"lost", (PyCFunction)Conn_lost, METH_NOARGS, "The socket is gone: drop every stream."},
    {NULL},
};

static PyObject *Conn_get_closing(Conn *c, void *unused) { return PyBool_FromLong(c->closing); }
static PyObject *Conn_get_open_streams(Conn *c, void *unused) { return PyLong_FromSsize_t(c->n_streams); }

static PyGetSetDef Conn_getset[] = {
    {"closing", (getter)Conn_get_closing, NULL, "True: close the socket once the output is written.", NULL},
    {"open_streams", (getter)Conn_get_open_streams, NULL, "Streams not yet ended.", NULL},
    {NULL},
};

static int Conn_init(Conn *c, PyObject *args, PyObject *kwds) {
    /* The ext_proc method's arguments (from ext_proc_path on) come all together, or not at all. */
    static char *keywords[] = {"methods", "decode_head", "grpc_error", "report", "ext_proc_path", "route",
                               "parse", "continues", "default_mode", "body_chunk", "body_fields", "max_message",
                               NULL};
    PyObject *methods, *decode_head, *grpc_error, *report, *path = Py_None, *route_fn = NULL, *parse = NULL,
             *continues = NULL;
    int default_mode = 0;
    Py_ssize_t body_chunk = 0, max_message = 16 * 1024 * 1024;
    unsigned int request_body = 0, response_body = 0, p0 = 0, p1 = 0, p2 = 0, body_field = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOO|OOOOin(IIIIII)n", keywords, &PyDict_Type, &methods,
                                     &decode_head, &grpc_error, &report, &path, &route_fn, &parse, &continues,
                                     &default_mode, &body_chunk, &request_body, &response_body, &p0, &p1, &p2,
                                     &body_field, &max_message))
        return -1;
    if (path != Py_None) {
        if (!PyUnicode_Check(path) || route_fn == NULL || parse == NULL || continues == NULL || body_chunk <= 0 ||
            !PyTuple_Check(continues) || PyTuple_GET_SIZE(continues) != N_CONTINUES) {
            PyErr_SetString(PyExc_TypeError, "ext_proc_path (str) comes with route, parse, continues (6 bytes), "
                                             "default_mode, body_chunk (positive) and body_fields");
            return -1;
        }
        for (int i = 0; i < N_CONTINUES; i++) {
            PyObject *b = PyTuple_GET_ITEM(continues, i);
            if (!PyBytes_Check(b)) {
                PyErr_SetString(PyExc_TypeError, "continues: a tuple of 6 bytes");
                return -1;
            }
            Py_INCREF(b);
            Py_XSETREF(c->continues[i], b);
        }
    }
    Py_INCREF(methods);
    Py_XSETREF(c->methods, methods);
    Py_INCREF(decode_head);
    Py_XSETREF(c->decode_head, decode_head);
    Py_INCREF(grpc_error);
    Py_XSETREF(c->grpc_error, grpc_error);
    Py_INCREF(report);
    Py_XSETREF(c->report, report);
    if (path != Py_None) {
        Py_INCREF(path);
        Py_XSETREF(c->ext_proc_path, path);
        Py_INCREF(route_fn);
        Py_XSETREF(c->route, route_fn);
        Py_INCREF(parse);
        Py_XSETREF(c->parse, parse);
    }
    c->default_mode = default_mode;
    c->body_chunk = body_chunk;
    c->max_message = max_message;
    c->request_body_field = request_body;
    c->response_body_field = response_body;
    c->streamed_path[0] = p0;
    c->streamed_path[1] = p1;
    c->streamed_path[2] = p2;
    c->body_field = body_field;
    if (c->decoded == NULL && (c->decoded = PyDict_New()) == NULL)
        return -1;
    c->peer_window = DEFAULT_WINDOW;
    c->peer_initial_window = DEFAULT_WINDOW;
    c->peer_max_frame = DEFAULT_FRAME_SIZE;
    return 0;
}

static int Conn_traverse(Conn *c, visitproc visit, void *arg) {
    Py_VISIT(c->methods);
    Py_VISIT(c->decode_head);
    Py_VISIT(c->grpc_error);
    Py_VISIT(c->report);
    Py_VISIT(c->route);
    Py_VISIT(c->parse);
    Py_VISIT(c->decoded);
    for (Py_ssize_t i = 0; i < c->n_streams; i++)
        Py_VISIT(c->streams[i]->handler);
    return 0;
}

static int Conn_clear(Conn *c) {
    clear_streams(c);
    Py_CLEAR(c->methods);
    Py_CLEAR(c->decode_head);
    Py_CLEAR(c->grpc_error);
    Py_CLEAR(c->report);
    Py_CLEAR(c->ext_proc_path);
    Py_CLEAR(c->route);
    Py_CLEAR(c->parse);
    Py_CLEAR(c->decoded);
    for (int i = 0; i < N_CONTINUES; i++)
        Py_CLEAR(c->continues[i]);
    return 0;
}

static void Conn_dealloc(Conn *c) {
    PyObject_GC_UnTrack(c);
    Conn_clear(c);
    PyMem_Free(c->streams);
    buf_free(&c->inbox);
    buf_free(&c->out);
    buf_free(&c->header_block);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyTypeObject ConnType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "disagg.epp._h2native.Connection",
    .tp_doc = "One HTTP/2 gRPC server connection, sans-IO (see the module's comment).",
    .tp_basicsize = sizeof(Conn),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Conn_init,
    .tp_dealloc = (destructor)Conn_dealloc,
    .tp_traverse = (traverseproc)Conn_traverse,
    .tp_clear = (inquiry)Conn_clear,
    .tp_methods = Conn_methods,
    .tp_getset = Conn_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_h2native", "The EPP's gRPC server connection in C (see disagg.epp.h2grpc).", -1, NULL,
};

PyMODINIT_FUNC PyInit__h2native(void) {
    if (PyType_Ready(&ConnType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ConnType);
    if (PyModule_AddObject(m, "Connection", (PyObject *)&ConnType) < 0) {
        Py_DECREF(&ConnType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
