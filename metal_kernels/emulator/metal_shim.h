// The subset of the Metal Shading Language our kernel bodies use, for a host C++ compiler.
//
// Two modes:
//   * runtime (g++, default): address-space qualifiers vanish, `half` is _Float16, `bfloat16_t`
//     a 16-bit struct with MLX's conversion rules, simd collectives and barriers call the fiber
//     scheduler in runtime.cpp.
//   * HNET_EMU_SYNTAX (clang++ -fsyntax-only, aarch64 target so _Float16/__bf16 exist): device,
//     constant and threadgroup become distinct clang address spaces, so a kernel that mixes them
//     (a device pointer stored in a thread pointer, say) fails to compile as it would on Metal.
//     Nothing is defined beyond what the check needs and no system header is read.
// Only functions that exist in Metal are declared (there is no log1p or expm1, for instance), so a
// body that calls something Metal lacks fails here too.
#pragma once

#ifdef HNET_EMU_SYNTAX
typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __SIZE_TYPE__ size_t;
#define HNET_INLINE inline
#else
#include "runtime.h"
#define HNET_INLINE inline __attribute__((always_inline))
#endif

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

// ---- 16-bit floats ---------------------------------------------------------------------
typedef _Float16 half;
#ifdef HNET_EMU_SYNTAX
typedef __bf16 bfloat;  // storage-only in clang 14: bodies must convert to float to compute
#else
namespace hnet_emu_detail {
HNET_INLINE uint16_t float_to_bf16_bits(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x0040u);  // NaN stays NaN
  u += ((u >> 16) & 1u) + 0x7FFFu;  // round to nearest even
  return (uint16_t)(u >> 16);
}
HNET_INLINE float bf16_bits_to_float(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float x;
  __builtin_memcpy(&x, &u, 4);
  return x;
}
}  // namespace hnet_emu_detail

// bfloat16 as MLX defines it when Metal lacks a native bfloat: arithmetic in float, then rounded.
struct bfloat {
  uint16_t bits_;
  bfloat() = default;
  template <typename T>
  HNET_INLINE bfloat(T x) : bits_(hnet_emu_detail::float_to_bf16_bits(static_cast<float>(x))) {}
  template <typename T>
  HNET_INLINE operator T() const { return static_cast<T>(hnet_emu_detail::bf16_bits_to_float(bits_)); }
};
HNET_INLINE bfloat operator-(bfloat x) { return -static_cast<float>(x); }
#define HNET_BF_BINOP(op)                                                                          \
  HNET_INLINE bfloat operator op(bfloat a, bfloat b) { return static_cast<float>(a) op static_cast<float>(b); } \
  HNET_INLINE float operator op(bfloat a, float b) { return static_cast<float>(a) op b; }             \
  HNET_INLINE float operator op(float a, bfloat b) { return a op static_cast<float>(b); }             \
  HNET_INLINE float operator op(bfloat a, half b) { return static_cast<float>(a) op static_cast<float>(b); } \
  HNET_INLINE float operator op(half a, bfloat b) { return static_cast<float>(a) op static_cast<float>(b); } \
  HNET_INLINE bfloat operator op(bfloat a, int32_t b) { return static_cast<float>(a) op static_cast<float>(b); } \
  HNET_INLINE bfloat operator op(int32_t a, bfloat b) { return static_cast<float>(a) op static_cast<float>(b); } \
  HNET_INLINE bfloat operator op(bfloat a, uint32_t b) { return static_cast<float>(a) op static_cast<float>(b); } \
  HNET_INLINE bfloat operator op(uint32_t a, bfloat b) { return static_cast<float>(a) op static_cast<float>(b); }
HNET_BF_BINOP(+)
HNET_BF_BINOP(-)
HNET_BF_BINOP(*)
HNET_BF_BINOP(/)
#undef HNET_BF_BINOP
#define HNET_BF_CMP(op)                                                                            \
  HNET_INLINE bool operator op(bfloat a, bfloat b) { return static_cast<float>(a) op static_cast<float>(b); } \
  HNET_INLINE bool operator op(bfloat a, float b) { return static_cast<float>(a) op b; }              \
  HNET_INLINE bool operator op(float a, bfloat b) { return a op static_cast<float>(b); }
HNET_BF_CMP(<)
HNET_BF_CMP(>)
HNET_BF_CMP(<=)
HNET_BF_CMP(>=)
HNET_BF_CMP(==)
HNET_BF_CMP(!=)
#undef HNET_BF_CMP
#define HNET_BF_ASSIGN(op, bop)                                                                    \
  HNET_INLINE bfloat& operator op(bfloat& a, float b) { a = static_cast<float>(a) bop b; return a; }   \
  HNET_INLINE float& operator op(float& a, bfloat b) { a = a bop static_cast<float>(b); return a; }
HNET_BF_ASSIGN(+=, +)
HNET_BF_ASSIGN(-=, -)
HNET_BF_ASSIGN(*=, *)
HNET_BF_ASSIGN(/=, /)
#undef HNET_BF_ASSIGN
#endif
typedef half float16_t;     // MLX's names for the dtypes in generated signatures
typedef bfloat bfloat16_t;

// ---- vectors (only what thread-position attributes need) -------------------------------
struct uint2 {
  uint x, y;
  uint2() = default;
  HNET_INLINE uint2(uint a, uint b) : x(a), y(b) {}
};
struct uint3 {
  uint x, y, z;
  uint3() = default;
  HNET_INLINE uint3(uint a, uint b, uint c) : x(a), y(b), z(c) {}
};

// ---- the metal namespace ---------------------------------------------------------------
namespace metal {

#ifdef HNET_EMU_SYNTAX
#define HNET_MATH1(name)      \
  float name(float);          \
  half name(half);
#else
#define HNET_MATH1(name)                                                                  \
  HNET_INLINE float name(float x) { return __builtin_##name##f(x); }                       \
  HNET_INLINE half name(half x) { return (half)__builtin_##name##f((float)x); }            \
  HNET_INLINE bfloat name(bfloat x) { return __builtin_##name##f((float)x); }
#endif
HNET_MATH1(exp)
HNET_MATH1(exp2)
HNET_MATH1(log)
HNET_MATH1(log2)
HNET_MATH1(log10)
HNET_MATH1(sqrt)
HNET_MATH1(tanh)
HNET_MATH1(sin)
HNET_MATH1(cos)
HNET_MATH1(floor)
HNET_MATH1(ceil)
HNET_MATH1(round)
HNET_MATH1(trunc)
HNET_MATH1(fabs)
#undef HNET_MATH1

#ifdef HNET_EMU_SYNTAX
float rsqrt(float);
half rsqrt(half);
float abs(float);
half abs(half);
int abs(int);
float pow(float, float);
float powr(float, float);
float fma(float, float, float);
float fmax(float, float);
float fmin(float, float);
float copysign(float, float);
bool isnan(float);
bool isinf(float);
bool isfinite(float);
#else
HNET_INLINE float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
HNET_INLINE half rsqrt(half x) { return (half)(1.0f / __builtin_sqrtf((float)x)); }
HNET_INLINE float abs(float x) { return __builtin_fabsf(x); }
HNET_INLINE half abs(half x) { return (half)__builtin_fabsf((float)x); }
HNET_INLINE int abs(int x) { return x < 0 ? -x : x; }
HNET_INLINE float pow(float x, float y) { return __builtin_powf(x, y); }
HNET_INLINE float powr(float x, float y) { return __builtin_powf(x, y); }
HNET_INLINE float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
HNET_INLINE float fmax(float a, float b) { return __builtin_fmaxf(a, b); }
HNET_INLINE float fmin(float a, float b) { return __builtin_fminf(a, b); }
HNET_INLINE float copysign(float a, float b) { return __builtin_copysignf(a, b); }
HNET_INLINE bool isnan(float x) { return __builtin_isnan(x); }
HNET_INLINE bool isinf(float x) { return __builtin_isinf(x); }
HNET_INLINE bool isfinite(float x) { return __builtin_isfinite(x); }
#endif

// max/min/clamp/select are generic in Metal: both operands of one type.
template <typename T>
HNET_INLINE T max(T a, T b) { return a > b ? a : b; }
template <typename T>
HNET_INLINE T min(T a, T b) { return a < b ? a : b; }
template <typename T>
HNET_INLINE T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <typename T>
HNET_INLINE T select(T a, T b, bool c) { return c ? b : a; }

namespace fast {
using metal::exp;
using metal::exp2;
using metal::log;
using metal::log2;
using metal::sqrt;
using metal::rsqrt;
using metal::tanh;
using metal::pow;
using metal::powr;
using metal::max;
using metal::min;
using metal::abs;
}  // namespace fast
namespace precise {
using metal::exp;
using metal::exp2;
using metal::log;
using metal::log2;
using metal::sqrt;
using metal::rsqrt;
using metal::tanh;
using metal::pow;
using metal::powr;
using metal::abs;
}  // namespace precise

template <typename T>
struct numeric_limits;
template <>
struct numeric_limits<float> {
  static constexpr float infinity() { return __builtin_huge_valf(); }
  static constexpr float max() { return 3.40282346638528859812e+38f; }
  static constexpr float lowest() { return -3.40282346638528859812e+38f; }
  static constexpr float quiet_NaN() { return __builtin_nanf(""); }
};

template <typename To, typename From>
HNET_INLINE To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of one size");
  To y;
  __builtin_memcpy(&y, &x, sizeof(To));
  return y;
}

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
HNET_INLINE mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags((int)a | (int)b); }

#ifdef HNET_EMU_SYNTAX
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);
template <typename T> T simd_sum(T);
template <typename T> T simd_product(T);
template <typename T> T simd_max(T);
template <typename T> T simd_min(T);
template <typename T> T simd_prefix_inclusive_sum(T);
template <typename T> T simd_prefix_exclusive_sum(T);
template <typename T> T simd_prefix_inclusive_product(T);
template <typename T> T simd_prefix_exclusive_product(T);
template <typename T> T simd_broadcast(T, ushort);
template <typename T> T simd_broadcast_first(T);
template <typename T> T simd_shuffle(T, ushort);
template <typename T> T simd_shuffle_up(T, ushort);
template <typename T> T simd_shuffle_down(T, ushort);
template <typename T> T simd_shuffle_xor(T, ushort);
bool simd_all(bool);
bool simd_any(bool);
#else
// Plain calls identify their site by return address; the macros at the end of this file route
// the usual spelling through the *_at versions, which carry a unique site id and the line.
HNET_INLINE void threadgroup_barrier(mem_flags) { hnet_emu_barrier(0, 0, -1); }
HNET_INLINE void simdgroup_barrier(mem_flags) { hnet_emu_barrier(1, 0, -1); }
HNET_INLINE void threadgroup_barrier_at(intptr_t site, int line, mem_flags) { hnet_emu_barrier(0, site, line); }
HNET_INLINE void simdgroup_barrier_at(intptr_t site, int line, mem_flags) { hnet_emu_barrier(1, site, line); }

namespace emu {
constexpr int W = HNET_EMU_SIMD_WIDTH;
constexpr int S = HNET_EMU_SLOT_BYTES;
template <typename T>
HNET_INLINE T get(const unsigned char* p, int lane) {
  T v;
  __builtin_memcpy(&v, p + lane * S, sizeof(T));
  return v;
}
template <typename T>
HNET_INLINE void put(unsigned char* p, int lane, T v) { __builtin_memcpy(p + lane * S, &v, sizeof(T)); }

// Reductions and scans visit the active lanes in lane order (Metal's own order is unspecified).
template <typename T, int KIND>  // 0 sum, 1 product, 2 max, 3 min
void reduce(const unsigned char* active, const unsigned char* in, const int32_t*, unsigned char* out) {
  bool first = true;
  T acc{};
  for (int i = 0; i < W; ++i) {
    if (!active[i]) continue;
    T v = get<T>(in, i);
    if (first) acc = v;
    else if (KIND == 0) acc = acc + v;
    else if (KIND == 1) acc = acc * v;
    else if (KIND == 2) acc = v > acc ? v : acc;
    else acc = v < acc ? v : acc;
    first = false;
  }
  for (int i = 0; i < W; ++i)
    if (active[i]) put<T>(out, i, acc);
}
template <typename T, int KIND>  // 0 inclusive sum, 1 exclusive sum, 2 inclusive product, 3 exclusive product
void scan(const unsigned char* active, const unsigned char* in, const int32_t*, unsigned char* out) {
  const bool sum = KIND < 2, inclusive = KIND % 2 == 0;
  T acc = sum ? T(0) : T(1);
  for (int i = 0; i < W; ++i) {
    if (!active[i]) continue;
    T v = get<T>(in, i);
    T next = sum ? T(acc + v) : T(acc * v);
    put<T>(out, i, inclusive ? next : acc);
    acc = next;
  }
}
// Lane movement: source lane per KIND; a source lane that is not active gives poison (0xFF bytes),
// the undefined value Metal would return. up/down keep their own value where the source falls
// outside the simdgroup, as Metal documents.
template <typename T, int KIND>  // 0 shuffle/broadcast, 1 up, 2 down, 3 xor, 4 broadcast_first
void move(const unsigned char* active, const unsigned char* in, const int32_t* arg, unsigned char* out) {
  int first = 0;
  while (first < W && !active[first]) ++first;
  for (int i = 0; i < W; ++i) {
    if (!active[i]) continue;
    int src;
    if (KIND == 0) src = arg[i];
    else if (KIND == 1) src = i - arg[i] < 0 ? i : i - arg[i];
    else if (KIND == 2) src = i + arg[i] >= W ? i : i + arg[i];
    else if (KIND == 3) src = i ^ arg[i];
    else src = first;
    if (src < 0 || src >= W || !active[src]) {
      unsigned char poison[S];
      __builtin_memset(poison, 0xFF, S);
      __builtin_memcpy(out + i * S, poison, S);
    } else {
      __builtin_memcpy(out + i * S, in + src * S, S);
    }
  }
}
template <int KIND>  // 0 all, 1 any
void vote(const unsigned char* active, const unsigned char* in, const int32_t*, unsigned char* out) {
  bool all = true, any = false;
  for (int i = 0; i < W; ++i) {
    if (!active[i]) continue;
    bool v = get<bool>(in, i);
    all &= v;
    any |= v;
  }
  for (int i = 0; i < W; ++i)
    if (active[i]) put<bool>(out, i, KIND == 0 ? all : any);
}
template <typename T>
HNET_INLINE T call(hnet_emu_collective_fn fn, T x, int32_t arg, intptr_t site = 0, int line = -1) {
  static_assert(sizeof(T) <= S, "simd collective on a value wider than 16 bytes");
  T r;
  hnet_emu_collective(fn, &x, sizeof(T), arg, &r, site, line);
  return r;
}
}  // namespace emu

template <typename T> HNET_INLINE T simd_sum(T x) { return emu::call(&emu::reduce<T, 0>, x, 0); }
template <typename T> HNET_INLINE T simd_product(T x) { return emu::call(&emu::reduce<T, 1>, x, 0); }
template <typename T> HNET_INLINE T simd_max(T x) { return emu::call(&emu::reduce<T, 2>, x, 0); }
template <typename T> HNET_INLINE T simd_min(T x) { return emu::call(&emu::reduce<T, 3>, x, 0); }
template <typename T> HNET_INLINE T simd_prefix_inclusive_sum(T x) { return emu::call(&emu::scan<T, 0>, x, 0); }
template <typename T> HNET_INLINE T simd_prefix_exclusive_sum(T x) { return emu::call(&emu::scan<T, 1>, x, 0); }
template <typename T> HNET_INLINE T simd_prefix_inclusive_product(T x) { return emu::call(&emu::scan<T, 2>, x, 0); }
template <typename T> HNET_INLINE T simd_prefix_exclusive_product(T x) { return emu::call(&emu::scan<T, 3>, x, 0); }
template <typename T> HNET_INLINE T simd_broadcast(T x, ushort lane) { return emu::call(&emu::move<T, 0>, x, lane); }
template <typename T> HNET_INLINE T simd_shuffle(T x, ushort lane) { return emu::call(&emu::move<T, 0>, x, lane); }
template <typename T> HNET_INLINE T simd_shuffle_up(T x, ushort delta) { return emu::call(&emu::move<T, 1>, x, delta); }
template <typename T> HNET_INLINE T simd_shuffle_down(T x, ushort delta) { return emu::call(&emu::move<T, 2>, x, delta); }
template <typename T> HNET_INLINE T simd_shuffle_xor(T x, ushort mask) { return emu::call(&emu::move<T, 3>, x, mask); }
template <typename T> HNET_INLINE T simd_broadcast_first(T x) { return emu::call(&emu::move<T, 4>, x, 0); }
HNET_INLINE bool simd_all(bool x) { return emu::call(&emu::vote<0>, x, 0); }
HNET_INLINE bool simd_any(bool x) { return emu::call(&emu::vote<1>, x, 0); }
template <typename T> HNET_INLINE T simd_sum_at(intptr_t site, int line, T x) { return emu::call(&emu::reduce<T, 0>, x, 0, site, line); }
template <typename T> HNET_INLINE T simd_product_at(intptr_t site, int line, T x) { return emu::call(&emu::reduce<T, 1>, x, 0, site, line); }
template <typename T> HNET_INLINE T simd_max_at(intptr_t site, int line, T x) { return emu::call(&emu::reduce<T, 2>, x, 0, site, line); }
template <typename T> HNET_INLINE T simd_min_at(intptr_t site, int line, T x) { return emu::call(&emu::reduce<T, 3>, x, 0, site, line); }
template <typename T> HNET_INLINE T simd_prefix_inclusive_sum_at(intptr_t site, int line, T x) { return emu::call(&emu::scan<T, 0>, x, 0, site, line); }
template <typename T> HNET_INLINE T simd_prefix_exclusive_sum_at(intptr_t site, int line, T x) { return emu::call(&emu::scan<T, 1>, x, 0, site, line); }
template <typename T> HNET_INLINE T simd_prefix_inclusive_product_at(intptr_t site, int line, T x) { return emu::call(&emu::scan<T, 2>, x, 0, site, line); }
template <typename T> HNET_INLINE T simd_prefix_exclusive_product_at(intptr_t site, int line, T x) { return emu::call(&emu::scan<T, 3>, x, 0, site, line); }
template <typename T> HNET_INLINE T simd_broadcast_at(intptr_t site, int line, T x, ushort a) { return emu::call(&emu::move<T, 0>, x, a, site, line); }
template <typename T> HNET_INLINE T simd_shuffle_at(intptr_t site, int line, T x, ushort a) { return emu::call(&emu::move<T, 0>, x, a, site, line); }
template <typename T> HNET_INLINE T simd_shuffle_up_at(intptr_t site, int line, T x, ushort a) { return emu::call(&emu::move<T, 1>, x, a, site, line); }
template <typename T> HNET_INLINE T simd_shuffle_down_at(intptr_t site, int line, T x, ushort a) { return emu::call(&emu::move<T, 2>, x, a, site, line); }
template <typename T> HNET_INLINE T simd_shuffle_xor_at(intptr_t site, int line, T x, ushort a) { return emu::call(&emu::move<T, 3>, x, a, site, line); }
template <typename T> HNET_INLINE T simd_broadcast_first_at(intptr_t site, int line, T x) { return emu::call(&emu::move<T, 4>, x, 0, site, line); }
HNET_INLINE bool simd_all_at(intptr_t site, int line, bool x) { return emu::call(&emu::vote<0>, x, 0, site, line); }
HNET_INLINE bool simd_any_at(intptr_t site, int line, bool x) { return emu::call(&emu::vote<1>, x, 0, site, line); }
#endif

}  // namespace metal

using namespace metal;  // as MLX's preamble (bf16.h) does

#define METAL_FUNC inline
// Address spaces last, so nothing above is rewritten by them.
#ifdef HNET_EMU_SYNTAX
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
#else
#define device
#define constant
#define threadgroup
#define thread
#endif

#ifndef HNET_EMU_SYNTAX
// Give every barrier and collective in a kernel body its own site id (__COUNTER__ counts textual
// occurrences) and its line, so lanes are matched per call and messages can point at the body.
#define simd_sum(x) simd_sum_at(__COUNTER__ + 1, __LINE__, x)
#define simd_product(x) simd_product_at(__COUNTER__ + 1, __LINE__, x)
#define simd_max(x) simd_max_at(__COUNTER__ + 1, __LINE__, x)
#define simd_min(x) simd_min_at(__COUNTER__ + 1, __LINE__, x)
#define simd_prefix_inclusive_sum(x) simd_prefix_inclusive_sum_at(__COUNTER__ + 1, __LINE__, x)
#define simd_prefix_exclusive_sum(x) simd_prefix_exclusive_sum_at(__COUNTER__ + 1, __LINE__, x)
#define simd_prefix_inclusive_product(x) simd_prefix_inclusive_product_at(__COUNTER__ + 1, __LINE__, x)
#define simd_prefix_exclusive_product(x) simd_prefix_exclusive_product_at(__COUNTER__ + 1, __LINE__, x)
#define simd_broadcast(x, a) simd_broadcast_at(__COUNTER__ + 1, __LINE__, x, a)
#define simd_shuffle(x, a) simd_shuffle_at(__COUNTER__ + 1, __LINE__, x, a)
#define simd_shuffle_up(x, a) simd_shuffle_up_at(__COUNTER__ + 1, __LINE__, x, a)
#define simd_shuffle_down(x, a) simd_shuffle_down_at(__COUNTER__ + 1, __LINE__, x, a)
#define simd_shuffle_xor(x, a) simd_shuffle_xor_at(__COUNTER__ + 1, __LINE__, x, a)
#define simd_broadcast_first(x) simd_broadcast_first_at(__COUNTER__ + 1, __LINE__, x)
#define simd_all(x) simd_all_at(__COUNTER__ + 1, __LINE__, x)
#define simd_any(x) simd_any_at(__COUNTER__ + 1, __LINE__, x)
#define threadgroup_barrier(f) threadgroup_barrier_at(__COUNTER__ + 1, __LINE__, f)
#define simdgroup_barrier(f) simdgroup_barrier_at(__COUNTER__ + 1, __LINE__, f)
#endif
