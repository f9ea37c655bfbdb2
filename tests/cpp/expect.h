// Minimal check macro shared by the C++ test programs: EXPECT(cond, msg) counts a check and,
// when cond is false, a failure (printed with file and line); finish() prints the tally and
// returns the process exit code.
#pragma once

#include <iostream>

namespace ompq_test {

inline int g_failures = 0;
inline int g_checks = 0;

inline int finish() {
  std::cout << g_checks - g_failures << "/" << g_checks << " checks passed" << std::endl;
  return g_failures == 0 ? 0 : 1;
}

}  // namespace ompq_test

#define EXPECT(cond, msg)                                                                  \
  do {                                                                                     \
    ++ompq_test::g_checks;                                                                 \
    if (!(cond)) {                                                                         \
      ++ompq_test::g_failures;                                                             \
      std::cerr << "FAIL " << __FILE__ << ":" << __LINE__ << ": " << msg << std::endl;     \
    }                                                                                      \
  } while (0)
