/* warmpod's edge engine: an MLP or a BERT encoder (+ pooling) run in FP32 inside a WebAssembly reactor.
 * The host-facing contract (exports, statuses, tensor indices, run layout) is wasm/ABI.md; kernels.c holds the math.
 *
 * Memory: the model's tensors are FP32 arrays the engine owns (Linear weights packed for the GEMM at wp_set_tensor);
 * wp_run carves its activations from one scratch block that grows to the largest batch seen and is kept. */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define EXPORT(name) __attribute__((export_name(#name)))

enum { WP_OK = 0, WP_BAD_ARG = -1, WP_NO_MEMORY = -2, WP_BAD_TENSOR = -3, WP_BAD_INPUT = -4, WP_NOT_READY = -5 };
enum { KIND_MLP = 1, KIND_BERT = 2 };
enum { ACT_IDENTITY = 0, ACT_RELU = 1, ACT_TANH = 2, ACT_GELU = 3, ACT_SIGMOID = 4, ACT_GELU_TANH = 5 };
enum { OUT_NONE = 0, OUT_SOFTMAX = 1, OUT_SIGMOID = 2 };
enum { POOL_MEAN = 0, POOL_CLS = 1, POOL_MAX = 2, POOL_MEAN_SQRT_LEN = 3 };
enum { DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_I8 = 2 };

/* ------------------------------------------------------------------------------------------------ errors */

static char error_text[512];

/* A small vsnprintf for the messages (%d %s %p %llu; %p prints the guest address in decimal): wasi-libc's
 * vsnprintf pulls in stdio, whose stderr imports WASI functions, and the engine must import nothing. */
static void format_v(char *out, size_t cap, const char *fmt, va_list args) {
    size_t n = 0;
    char digits[24];
    for (const char *f = fmt; *f && n + 1 < cap; f++) {
        const char *text;
        unsigned long long u = 0;
        int negative = 0, number = 1;
        if (*f != '%') {
            out[n++] = *f;
            continue;
        }
        if (!f[1]) break;
        if (f[1] == 's') {
            text = va_arg(args, const char *);
            number = 0;
        } else if (f[1] == 'd') {
            int v = va_arg(args, int);
            negative = v < 0;
            u = negative ? 0ull - (unsigned long long)v : (unsigned long long)v;
        } else if (f[1] == 'p') {
            u = (uintptr_t)va_arg(args, void *);
        } else if (f[1] == 'l' && f[2] == 'l' && f[3] == 'u') {
            u = va_arg(args, unsigned long long);
            f += 2;
        } else {
            text = "%?";
            number = 0;
        }
        f++;
        if (number) {
            char *d = digits + sizeof digits - 1;
            *d = 0;
            do *--d = (char)('0' + u % 10);
            while (u /= 10);
            if (negative) *--d = '-';
            text = d;
        }
        while (*text && n + 1 < cap) out[n++] = *text++;
    }
    out[n] = 0;
}

__attribute__((format(printf, 3, 4))) static void format(char *out, size_t cap, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    format_v(out, cap, fmt, args);
    va_end(args);
}

__attribute__((format(printf, 2, 3))) static int fail(int status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    format_v(error_text, sizeof error_text, fmt, args);
    va_end(args);
    return status;
}

/* Allocate or fail with the ABI's message; NULL means WP_NO_MEMORY with wp_error() set. */
static void *allocate(uint64_t bytes, int zero) {
    void *p = NULL;
    if (bytes <= 0xFFFFFFF0u) {
        size_t n = bytes ? (size_t)((bytes + 15) & ~(uint64_t)15) : 16;
        p = aligned_alloc(16, n);
        if (p && zero) memset(p, 0, n);
    }
    if (!p) fail(WP_NO_MEMORY, "out of memory allocating %llu bytes", (unsigned long long)bytes);
    return p;
}

/* Whether [p, p + bytes) lies inside linear memory (a host handing a bad pointer gets WP_BAD_ARG, not a trap). */
static int in_memory(const void *p, uint64_t bytes) {
    return p != NULL && (uint64_t)(uintptr_t)p + bytes <= (uint64_t)__builtin_wasm_memory_size(0) * 65536u;
}

/* ------------------------------------------------------------------------------------------------ the model */

/* A Linear layer packed for gemm: y[out] = x[in] · W^T + bias (bias zero-padded to whole panels). */
typedef struct {
    int in, out;
    float *packed, *bias;
} Linear;

typedef enum { DEST_TABLE, DEST_WEIGHT, DEST_BIAS } Dest;

/* Where tensor `index` goes and what shape it must have: [rows, cols], or [rows] when cols == 0. */
typedef struct {
    int rows, cols;
    Dest dest;
    float **table;  /* DEST_TABLE: the engine-owned FP32 array */
    Linear *linear; /* DEST_WEIGHT / DEST_BIAS: the layer, and the output column its rows start at */
    int column;
    int set;
} Slot;

typedef struct {
    Linear qkv; /* query, key and value fused: output columns [0, H8) [H8, 2 H8) [2 H8, 3 H8), H8 = H rounded to NR */
    Linear attn_out, inter, out;
    float *ln1_g, *ln1_b, *ln2_g, *ln2_b;
} BertLayer;

static struct {
    int kind, ready, n_slots;
    Slot *slots;
    /* MLP */
    int n_layers, activation, output_activation;
    int *sizes;
    Linear *linears;
    /* BERT */
    int vocab, hidden, layers, heads, intermediate, max_position, type_vocab, hidden_act, pooling, normalize;
    float eps;
    float *word, *position, *token_type, *emb_g, *emb_b;
    BertLayer *bert;
} model;

static void *scratch;
static size_t scratch_bytes;

static const char *const BERT_EMBEDDING_NAMES[5] = {
    "word_embeddings", "position_embeddings", "token_type_embeddings", "embeddings LayerNorm.weight",
    "embeddings LayerNorm.bias",
};
static const char *const BERT_LAYER_NAMES[16] = {
    "query.weight", "query.bias", "key.weight", "key.bias", "value.weight", "value.bias",
    "attention.output.dense.weight", "attention.output.dense.bias", "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias", "intermediate.dense.weight", "intermediate.dense.bias",
    "output.dense.weight", "output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias",
};

/* "tensor 7 (layer 0 key.bias)" */
static const char *tensor_name(int index) {
    static char name[96];
    if (model.kind == KIND_MLP)
        format(name, sizeof name, "tensor %d (layer %d %s)", index, index / 2, index % 2 ? "bias" : "weight");
    else if (index < 5)
        format(name, sizeof name, "tensor %d (%s)", index, BERT_EMBEDDING_NAMES[index]);
    else
        format(name, sizeof name, "tensor %d (layer %d %s)", index, (index - 5) / 16,
                 BERT_LAYER_NAMES[(index - 5) % 16]);
    return name;
}

/* "[384]" or "[384, 384]" */
static const char *shape_text(const Slot *s) {
    static char text[32];
    if (s->cols) format(text, sizeof text, "[%d, %d]", s->rows, s->cols);
    else format(text, sizeof text, "[%d]", s->rows);
    return text;
}

static void free_linear(Linear *l) {
    free(l->packed);
    free(l->bias);
}

static void reset_model(void) {
    for (int i = 0; i < model.n_slots; i++)
        if (model.slots[i].dest == DEST_TABLE) free(*model.slots[i].table);
    if (model.linears)
        for (int i = 0; i < model.n_layers; i++) free_linear(&model.linears[i]);
    if (model.bert)
        for (int i = 0; i < model.layers; i++) {
            free_linear(&model.bert[i].qkv);
            free_linear(&model.bert[i].attn_out);
            free_linear(&model.bert[i].inter);
            free_linear(&model.bert[i].out);
        }
    free(model.slots);
    free(model.sizes);
    free(model.linears);
    free(model.bert);
    memset(&model, 0, sizeof model);
    free(scratch);
    scratch = NULL;
    scratch_bytes = 0;
}

/* The Linear's packed weight and padded bias; 0 or WP_NO_MEMORY. */
static int make_linear(Linear *l, int in, int out) {
    l->in = in;
    l->out = out;
    l->packed = allocate((uint64_t)packed_floats(out, in) * 4, 1);
    l->bias = l->packed ? allocate((uint64_t)round_up(out, NR) * 4, 1) : NULL;
    return l->bias ? WP_OK : WP_NO_MEMORY;
}

static void table_slot(Slot *s, int rows, int cols, float **table) {
    *s = (Slot){.rows = rows, .cols = cols, .dest = DEST_TABLE, .table = table};
}

static void linear_slots(Slot *s, Linear *l, int rows, int column) {
    s[0] = (Slot){.rows = rows, .cols = l->in, .dest = DEST_WEIGHT, .linear = l, .column = column};
    s[1] = (Slot){.rows = rows, .dest = DEST_BIAS, .linear = l, .column = column};
}

static int too_big(uint64_t rows, uint64_t cols) { return rows * cols > INT32_MAX; }

static int init_mlp(const int32_t *cfg, int words) {
    int n = words > 0 ? cfg[0] : 0;
    if (n < 1 || n > 1024 || words != n + 4)
        return fail(WP_BAD_ARG, "MLP description: %d words for %d layers; expected n_layers + 4 words", words, n);
    model.sizes = allocate((uint64_t)(n + 1) * sizeof(int), 0);
    if (!model.sizes) return WP_NO_MEMORY;
    for (int i = 0; i <= n; i++) {
        model.sizes[i] = cfg[1 + i];
        if (model.sizes[i] < 1) return fail(WP_BAD_ARG, "MLP description: size_%d is %d; sizes must be positive", i, cfg[1 + i]);
        if (i && too_big((uint64_t)model.sizes[i], (uint64_t)model.sizes[i - 1]))
            return fail(WP_BAD_ARG, "MLP description: layer %d [%d, %d] has more than 2^31 elements", i - 1,
                        model.sizes[i], model.sizes[i - 1]);
    }
    model.n_layers = n;
    model.activation = cfg[n + 2];
    model.output_activation = cfg[n + 3];
    if (model.activation < ACT_IDENTITY || model.activation > ACT_SIGMOID)
        return fail(WP_BAD_ARG, "MLP description: activation %d is not 0 identity, 1 relu, 2 tanh, 3 gelu or 4 sigmoid",
                    model.activation);
    if (model.output_activation < OUT_NONE || model.output_activation > OUT_SIGMOID)
        return fail(WP_BAD_ARG, "MLP description: output_activation %d is not 0 none, 1 softmax or 2 sigmoid",
                    model.output_activation);
    model.linears = allocate((uint64_t)n * sizeof(Linear), 1);
    model.n_slots = 2 * n;
    model.slots = model.linears ? allocate((uint64_t)model.n_slots * sizeof(Slot), 1) : NULL;
    if (!model.slots) return WP_NO_MEMORY;
    for (int i = 0; i < n; i++) {
        if (make_linear(&model.linears[i], model.sizes[i], model.sizes[i + 1])) return WP_NO_MEMORY;
        linear_slots(&model.slots[2 * i], &model.linears[i], model.sizes[i + 1], 0);
    }
    return WP_OK;
}

static int init_bert(const int32_t *cfg, int words) {
    if (words != 11) return fail(WP_BAD_ARG, "BERT description: %d words; expected 11", words);
    static const char *const names[7] = {"vocab", "hidden", "layers", "heads", "intermediate", "max_position",
                                         "type_vocab"};
    for (int i = 0; i < 7; i++)
        if (cfg[i] < 1) return fail(WP_BAD_ARG, "BERT description: %s is %d; it must be positive", names[i], cfg[i]);
    model.vocab = cfg[0];
    model.hidden = cfg[1];
    model.layers = cfg[2];
    model.heads = cfg[3];
    model.intermediate = cfg[4];
    model.max_position = cfg[5];
    model.type_vocab = cfg[6];
    model.hidden_act = cfg[7];
    model.pooling = cfg[8];
    model.normalize = cfg[9];
    memcpy(&model.eps, &cfg[10], sizeof model.eps);
    int h = model.hidden;
    if (h % model.heads)
        return fail(WP_BAD_ARG, "BERT description: hidden %d is not a multiple of heads %d", h, model.heads);
    if (model.hidden_act != ACT_GELU && model.hidden_act != ACT_GELU_TANH && model.hidden_act != ACT_RELU)
        return fail(WP_BAD_ARG, "BERT description: hidden_act %d is not 3 gelu, 5 gelu (tanh) or 1 relu",
                    model.hidden_act);
    if (model.pooling < POOL_MEAN || model.pooling > POOL_MEAN_SQRT_LEN)
        return fail(WP_BAD_ARG, "BERT description: pooling %d is not 0 mean, 1 cls, 2 max or 3 mean_sqrt_len",
                    model.pooling);
    if (model.normalize != 0 && model.normalize != 1)
        return fail(WP_BAD_ARG, "BERT description: normalize is %d; it must be 0 or 1", model.normalize);
    if (!(model.eps > 0.0f) || !isfinite(model.eps))
        return fail(WP_BAD_ARG, "BERT description: layer_norm_eps must be a positive finite float");
    if (model.layers > 1024 || too_big((uint64_t)model.vocab, (uint64_t)h) ||
        too_big((uint64_t)model.max_position, (uint64_t)h) || too_big((uint64_t)model.type_vocab, (uint64_t)h) ||
        too_big((uint64_t)model.intermediate, (uint64_t)h) || too_big(3 * (uint64_t)round_up(h, NR), (uint64_t)h))
        return fail(WP_BAD_ARG, "BERT description: a tensor of this model would have more than 2^31 elements");

    model.bert = allocate((uint64_t)model.layers * sizeof(BertLayer), 1);
    model.n_slots = 5 + 16 * model.layers;
    model.slots = model.bert ? allocate((uint64_t)model.n_slots * sizeof(Slot), 1) : NULL;
    if (!model.slots) return WP_NO_MEMORY;
    Slot *s = model.slots;
    table_slot(&s[0], model.vocab, h, &model.word);
    table_slot(&s[1], model.max_position, h, &model.position);
    table_slot(&s[2], model.type_vocab, h, &model.token_type);
    table_slot(&s[3], h, 0, &model.emb_g);
    table_slot(&s[4], h, 0, &model.emb_b);
    int h8 = round_up(h, NR);
    for (int l = 0; l < model.layers; l++) {
        BertLayer *b = &model.bert[l];
        Slot *ls = &s[5 + 16 * l];
        if (make_linear(&b->qkv, h, 3 * h8) || make_linear(&b->attn_out, h, h) ||
            make_linear(&b->inter, h, model.intermediate) || make_linear(&b->out, model.intermediate, h))
            return WP_NO_MEMORY;
        linear_slots(&ls[0], &b->qkv, h, 0);
        linear_slots(&ls[2], &b->qkv, h, h8);
        linear_slots(&ls[4], &b->qkv, h, 2 * h8);
        linear_slots(&ls[6], &b->attn_out, h, 0);
        table_slot(&ls[8], h, 0, &b->ln1_g);
        table_slot(&ls[9], h, 0, &b->ln1_b);
        linear_slots(&ls[10], &b->inter, model.intermediate, 0);
        linear_slots(&ls[12], &b->out, h, 0);
        table_slot(&ls[14], h, 0, &b->ln2_g);
        table_slot(&ls[15], h, 0, &b->ln2_b);
    }
    return WP_OK;
}

/* ------------------------------------------------------------------------------------------------ exports */

EXPORT(wp_abi_version) int wp_abi_version(void) { return 1; }

EXPORT(wp_error) const char *wp_error(void) { return error_text; }

/* nbytes is read as unsigned: a "negative" size asks for more than 2 GiB and fails like any too-large request. */
EXPORT(wp_alloc) void *wp_alloc(uint32_t nbytes) { return allocate(nbytes, 0); }

EXPORT(wp_free) void wp_free(void *p) {
    if (in_memory(p, 1)) free(p);
}

EXPORT(wp_init) int wp_init(int kind, const int32_t *cfg, int words) {
    reset_model();
    if (words < 1 || words > 4096 || !in_memory(cfg, (uint64_t)words * 4))
        return fail(WP_BAD_ARG, "model description: %d words at %p is not a valid buffer", words, (void *)cfg);
    int status;
    model.kind = kind;
    if (kind == KIND_MLP) status = init_mlp(cfg, words);
    else if (kind == KIND_BERT) status = init_bert(cfg, words);
    else status = fail(WP_BAD_ARG, "model kind %d is not 1 (MLP) or 2 (BERT)", kind);
    if (status) reset_model();
    return status;
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0x1f) bits = sign | 0x7f800000u | (mantissa << 13);
    else if (exponent) bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    else {
        float f = (float)mantissa * 0x1p-24f; /* zero or subnormal: exact */
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

EXPORT(wp_set_tensor) int wp_set_tensor(int index, int dtype, int numel, void *data, float *scale) {
    float *values = NULL;
    int status = WP_OK;
    if (!model.kind) {
        status = fail(WP_BAD_ARG, "no model: call wp_init before wp_set_tensor");
        goto done;
    }
    if (index < 0 || index >= model.n_slots) {
        status = fail(WP_BAD_ARG, "tensor index %d is outside this model's tensors 0..%d", index, model.n_slots - 1);
        goto done;
    }
    Slot *s = &model.slots[index];
    const char *name = tensor_name(index);
    uint64_t expected = (uint64_t)s->rows * (uint64_t)(s->cols ? s->cols : 1);
    static const int item_size[3] = {4, 2, 1};
    if (dtype < DTYPE_F32 || dtype > DTYPE_I8)
        status = fail(WP_BAD_ARG, "%s: dtype %d is not 0 (F32), 1 (F16) or 2 (INT8)", name, dtype);
    else if (dtype == DTYPE_I8 && !s->cols)
        status = fail(WP_BAD_TENSOR, "%s: INT8 is only for weight matrices; send this vector as F32 or F16", name);
    else if (numel < 0 || (uint64_t)numel != expected)
        status = fail(WP_BAD_TENSOR, "%s: got %d elements, expected %s", name, numel, shape_text(s));
    else if (!in_memory(data, (uint64_t)numel * item_size[dtype]))
        status = fail(WP_BAD_ARG, "%s: data %p is not a buffer of %d elements", name, data, numel);
    else if (dtype == DTYPE_I8 && !in_memory(scale, (uint64_t)s->rows * 4))
        status = fail(WP_BAD_ARG, "%s: INT8 needs %d per-row F32 scales, got scale %p", name, s->rows, (void *)scale);
    else if (dtype != DTYPE_I8 && scale)
        status = fail(WP_BAD_ARG, "%s: scale must be 0 for F32 and F16 tensors", name);
    if (status) goto done;

    if (dtype == DTYPE_F32) {
        values = data; /* already FP32: adopt the host's buffer */
        data = NULL;
    } else {
        values = allocate((uint64_t)numel * 4, 0);
        if (!values) {
            status = WP_NO_MEMORY;
            goto done;
        }
        if (dtype == DTYPE_F16) {
            const uint16_t *h = data;
            for (int i = 0; i < numel; i++) values[i] = half_to_float(h[i]);
        } else {
            const int8_t *q = data;
            for (int r = 0, i = 0; r < s->rows; r++)
                for (int c = 0; c < s->cols; c++, i++) values[i] = (float)q[i] * scale[r];
        }
    }
    if (s->dest == DEST_TABLE) {
        free(*s->table);
        *s->table = values;
        values = NULL;
    } else if (s->dest == DEST_WEIGHT) {
        Linear *l = s->linear;
        pack_transposed(values, s->rows, l->in, l->in, l->packed + (size_t)s->column * l->in);
    } else {
        memcpy(s->linear->bias + s->column, values, (size_t)s->rows * 4);
    }
    s->set = 1;
done:
    /* The host handed both buffers over; one outside memory was never a wp_alloc buffer and is left alone. */
    if (in_memory(data, 1)) free(data);
    if (in_memory(scale, 1)) free(scale);
    free(values);
    return status;
}

EXPORT(wp_ready) int wp_ready(void) {
    if (!model.kind) return fail(WP_NOT_READY, "no model: call wp_init, then wp_set_tensor for every tensor");
    for (int i = 0; i < model.n_slots; i++)
        if (!model.slots[i].set) {
            model.ready = 0;
            return fail(WP_NOT_READY, "%s %s was not set: call wp_set_tensor for it", tensor_name(i),
                        shape_text(&model.slots[i]));
        }
    model.ready = 1;
    return WP_OK;
}

/* ------------------------------------------------------------------------------------------------ forward passes */

/* Scratch of at least `bytes`, kept between runs; NULL means WP_NO_MEMORY with wp_error() set. */
static void *reserve_scratch(uint64_t bytes) {
    if (bytes <= scratch_bytes) return scratch;
    free(scratch);
    scratch_bytes = 0;
    scratch = allocate(bytes, 0);
    if (scratch) scratch_bytes = (size_t)bytes;
    return scratch;
}

/* Hands out consecutive 16-byte aligned pieces of the scratch block. */
typedef struct {
    char *base;
    uint64_t used;
} Carver;

static void *carve(Carver *c, uint64_t bytes) {
    void *p = c->base + c->used;
    c->used += (bytes + 15) & ~(uint64_t)15;
    return p;
}

static void activate(int code, float *x, size_t n) {
    switch (code) {
    case ACT_RELU: relu(x, n); break;
    case ACT_TANH: tanh_inplace(x, n); break;
    case ACT_GELU: gelu_erf(x, n); break;
    case ACT_SIGMOID: sigmoid(x, n); break;
    case ACT_GELU_TANH: gelu_tanh(x, n); break;
    default: break;
    }
}

static int run_mlp(int batch, const float *input, float *output) {
    int n = model.n_layers, widest = 1;
    for (int i = 1; i < n; i++)
        if (model.sizes[i] > widest) widest = model.sizes[i];
    uint64_t out_floats = (uint64_t)batch * model.sizes[n] * (model.output_activation ? 2 : 1);
    if (!in_memory(input, (uint64_t)batch * model.sizes[0] * 4) || !in_memory(output, out_floats * 4))
        return fail(WP_BAD_ARG, "input %p or output %p is not a buffer of the batch's size", (void *)input,
                    (void *)output);
    uint64_t piece = (uint64_t)batch * widest * 4;
    if (!reserve_scratch(2 * ((piece + 15) & ~(uint64_t)15))) return WP_NO_MEMORY;
    Carver c = {scratch, 0};
    float *ping[2] = {carve(&c, piece), carve(&c, piece)};
    const float *x = input;
    for (int i = 0; i < n; i++) {
        const Linear *l = &model.linears[i];
        float *y = i == n - 1 ? output : ping[i % 2];
        gemm(batch, l->out, l->in, x, l->in, l->packed, l->bias, NULL, 0, y, l->out);
        if (i < n - 1) activate(model.activation, y, (size_t)batch * l->out);
        x = y;
    }
    if (model.output_activation) {
        int width = model.sizes[n];
        float *probabilities = output + (size_t)batch * width;
        memcpy(probabilities, output, (size_t)batch * width * 4);
        if (model.output_activation == OUT_SIGMOID) sigmoid(probabilities, (size_t)batch * width);
        else
            for (int b = 0; b < batch; b++) softmax_row(probabilities + (size_t)b * width, width, 1.0f);
    }
    return WP_OK;
}

/* Each row's token count from the mask (rows right-padded, at least one token), ids checked against the
 * vocabulary; the total and longest count. `length` may be NULL (sizing pass). */
static int check_tokens(int batch, int seq, const int32_t *ids, const int32_t *mask, int *length, uint64_t *total,
                        int *longest) {
    *total = 0;
    *longest = 0;
    for (int b = 0; b < batch; b++) {
        const int32_t *m = mask + (size_t)b * seq;
        int n = 0;
        while (n < seq && m[n] == 1) n++;
        for (int p = n; p < seq; p++)
            if (m[p] != 0)
                return fail(WP_BAD_INPUT,
                            "attention mask row %d position %d is %d: masks are 1 (token) then 0 (padding), right-padded",
                            b, p, m[p]);
        if (!n) return fail(WP_BAD_INPUT, "row %d has no tokens (its attention mask is all 0)", b);
        for (int p = 0; p < n; p++) {
            int32_t id = ids[(size_t)b * seq + p];
            if (id < 0 || id >= model.vocab)
                return fail(WP_BAD_INPUT, "token id %d at row %d position %d is outside the vocabulary (%d)", id, b, p,
                            model.vocab);
        }
        if (length) length[b] = n;
        *total += (uint64_t)n;
        if (n > *longest) *longest = n;
    }
    return WP_OK;
}

/* Self-attention of one sequence (L tokens from qkv, ld floats per token) into ctx (ldc floats per token). */
static void attention(int L, const float *qkv, int ld, float *ctx, int ldc, float *keys, float *values,
                      float *scores) {
    int h = model.hidden, d = h / model.heads, h8 = round_up(h, NR);
    float scale = (float)(1.0 / sqrt((double)d));
    for (int head = 0; head < model.heads; head++) {
        const float *q = qkv + head * d, *k = q + h8, *v = q + 2 * h8;
        pack_transposed(k, L, d, ld, keys);
        gemm(L, L, d, q, ld, keys, NULL, NULL, 0, scores, L);
        for (int i = 0; i < L; i++) softmax_row(scores + (size_t)i * L, L, scale);
        pack_plain(v, L, d, ld, values);
        gemm(L, d, L, scores, L, values, NULL, NULL, 0, ctx + head * d, ldc);
    }
}

/* Pool one sequence's token states x [L, H] into out [H], over its tokens only. */
static void pool_sequence(const float *x, int L, float *out) {
    int h = model.hidden;
    memcpy(out, x, (size_t)h * 4);
    if (model.pooling == POOL_CLS) return;
    for (int t = 1; t < L; t++) {
        const float *row = x + (size_t)t * h;
        if (model.pooling == POOL_MAX)
            for (int i = 0; i < h; i++) out[i] = max_num(out[i], row[i]);
        else add_into(out, row, (size_t)h);
    }
    if (model.pooling == POOL_MEAN)
        for (int i = 0; i < h; i++) out[i] /= (float)L;
    else if (model.pooling == POOL_MEAN_SQRT_LEN) {
        float root = sqrtf((float)L);
        for (int i = 0; i < h; i++) out[i] /= root;
    }
}

/* x / max(||x||, 1e-12), as torch's F.normalize. */
static void normalize(float *x, int n) {
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += (double)x[i] * x[i];
    float norm = (float)sqrt(sum);
    if (norm < 1e-12f) norm = 1e-12f;
    for (int i = 0; i < n; i++) x[i] /= norm;
}

static int run_bert(int batch, int seq, const int32_t *input, float *output) {
    if (seq > model.max_position)
        return fail(WP_BAD_INPUT, "sequence of %d tokens is longer than max_position_embeddings %d", seq,
                    model.max_position);
    if (!in_memory(input, (uint64_t)batch * seq * 8) || !in_memory(output, (uint64_t)batch * model.hidden * 4))
        return fail(WP_BAD_ARG, "input %p or output %p is not a buffer of the batch's size", (void *)input,
                    (void *)output);
    const int32_t *ids = input, *mask = input + (size_t)batch * seq;
    int h = model.hidden, h8 = round_up(h, NR), im = model.intermediate, d = h / model.heads;

    /* Only real tokens are computed: padding is dropped, each sequence keeps its own span of rows. */
    uint64_t rows;
    int longest;
    int status = check_tokens(batch, seq, ids, mask, NULL, &rows, &longest);
    if (status) return status;
    /* lengths, x, qkv, ctx, attended, inter, one head's packed keys and values, its scores */
    uint64_t sizes[9] = {(uint64_t)batch * 4,
                         rows * h * 4,
                         rows * 3 * h8 * 4,
                         rows * h * 4,
                         rows * h * 4,
                         rows * im * 4,
                         (uint64_t)packed_floats(longest, d) * 4,
                         (uint64_t)packed_floats(d, longest) * 4,
                         (uint64_t)longest * longest * 4};
    uint64_t total = 0;
    for (int i = 0; i < 9; i++) total += (sizes[i] + 15) & ~(uint64_t)15;
    if (!reserve_scratch(total)) return WP_NO_MEMORY;
    Carver c = {scratch, 0};
    int *length = carve(&c, sizes[0]);
    float *x = carve(&c, sizes[1]), *qkv = carve(&c, sizes[2]), *ctx = carve(&c, sizes[3]);
    float *attended = carve(&c, sizes[4]), *inter = carve(&c, sizes[5]);
    float *keys = carve(&c, sizes[6]), *values = carve(&c, sizes[7]), *scores = carve(&c, sizes[8]);
    check_tokens(batch, seq, ids, mask, length, &rows, &longest);

    /* Embeddings: word + token_type[0], then + position, then LayerNorm (HF's order). */
    for (int b = 0, t = 0; b < batch; b++)
        for (int p = 0; p < length[b]; p++, t++) {
            float *row = x + (size_t)t * h;
            memcpy(row, model.word + (size_t)ids[(size_t)b * seq + p] * h, (size_t)h * 4);
            add_into(row, model.token_type, (size_t)h);
            add_into(row, model.position + (size_t)p * h, (size_t)h);
        }
    int n = (int)rows;
    layer_norm(x, n, h, model.emb_g, model.emb_b, model.eps);

    for (int l = 0; l < model.layers; l++) {
        const BertLayer *L = &model.bert[l];
        gemm(n, 3 * h8, h, x, h, L->qkv.packed, L->qkv.bias, NULL, 0, qkv, 3 * h8);
        for (int b = 0, t = 0; b < batch; t += length[b], b++)
            attention(length[b], qkv + (size_t)t * 3 * h8, 3 * h8, ctx + (size_t)t * h, h, keys, values, scores);
        gemm(n, h, h, ctx, h, L->attn_out.packed, L->attn_out.bias, x, h, attended, h);
        layer_norm(attended, n, h, L->ln1_g, L->ln1_b, model.eps);
        gemm(n, im, h, attended, h, L->inter.packed, L->inter.bias, NULL, 0, inter, im);
        activate(model.hidden_act, inter, (size_t)n * im);
        gemm(n, h, im, inter, im, L->out.packed, L->out.bias, attended, h, x, h);
        layer_norm(x, n, h, L->ln2_g, L->ln2_b, model.eps);
    }

    for (int b = 0, t = 0; b < batch; t += length[b], b++) {
        float *out = output + (size_t)b * h;
        pool_sequence(x + (size_t)t * h, length[b], out);
        if (model.normalize) normalize(out, h);
    }
    return WP_OK;
}

EXPORT(wp_run) int wp_run(int batch, int seq, const void *input, float *output) {
    if (!model.kind || !model.ready)
        return fail(WP_NOT_READY, "model not ready: call wp_init, wp_set_tensor for every tensor, then wp_ready");
    if (batch < 1) return fail(WP_BAD_ARG, "batch is %d; it must be at least 1", batch);
    if (model.kind == KIND_MLP) return run_mlp(batch, input, output);
    if (seq < 1) return fail(WP_BAD_ARG, "seq is %d; it must be at least 1", seq);
    return run_bert(batch, seq, input, output);
}
