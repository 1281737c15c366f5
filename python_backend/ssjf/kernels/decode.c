/* The torch runner's CPU kernels, one translation unit (ssjf/kernels/__init__.py builds it with
 * the system C compiler, -march=native, and loads it with ctypes). Each kernel family is a header;
 * its variants (cache dtype, head size) are made here by defining macros and including it again. */
#include "common.h"

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

#define KDTYPE bf16
#define KT uint16_t
#include "pointwise.h"

#define KNAME bf16_64
#define KD 64
#include "attention.h"
#undef KNAME
#undef KD

#define KNAME bf16_128
#define KD 128
#include "attention.h"
#undef KNAME
#undef KD

#define KNAME bf16_any
#define KD head_dim
#include "attention.h"
#undef KNAME
#undef KD

#undef KDTYPE
#undef KT

#define KDTYPE f32
#define KT float
#include "pointwise.h"

#define KNAME f32_64
#define KD 64
#include "attention.h"
#undef KNAME
#undef KD

#define KNAME f32_128
#define KD 128
#include "attention.h"
#undef KNAME
#undef KD

#define KNAME f32_any
#define KD head_dim
#include "attention.h"
#undef KNAME
#undef KD

#undef KDTYPE
#undef KT

#include "amx.h"
#include "dpbf.h"
