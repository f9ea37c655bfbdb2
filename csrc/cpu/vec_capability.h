// Select the widest at::vec implementation the compiler targets. Include this BEFORE any ATen
// header. setup.py builds with -march=native unless OMPQ_PORTABLE=1 (a portable build uses the
// generic implementation). Every capability lives in its own inline namespace (at::vec::AVX512,
// at::vec::AVX2, ...), so translation units built this way cannot clash with each other or torch.
#pragma once
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif
