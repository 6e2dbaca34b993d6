#pragma once
// A self-contained test harness: the GPU machine has no gtest and no internet, so the CPU tests
// cannot depend on one (why not GoogleTest where it exists: see the C++ CPU tests in CMakeLists.txt).
// EXPECT_* records a failure and continues; ASSERT_* ends the test.
// main() (tests/cpu/main.cpp) takes, at most, one of:
//   (nothing)      run every MOELINK_TEST
//   SUBSTRING      run the tests whose name contains SUBSTRING
//   --exact NAME   run the test called NAME (each ctest entry runs one test this way)
//   --list         print every test name, one a line (the build registers them with ctest)
// and ends with "N passed, M failed". Selecting no test is a failure: a renamed or deleted test must
// not leave behind a ctest entry that passes without running anything.
#include <cstdio>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "moelink/error.hpp"

namespace moelink::testing {

struct TestCase {
  const char* name;
  void (*body)();
  const char* file;
  int line;
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

// Failures of the test now running; reset by the runner before each test.
inline int& current_failures() {
  static int failures = 0;
  return failures;
}

struct Registrar {
  Registrar(const char* name, void (*body)(), const char* file, int line) {
    registry().push_back({name, body, file, line});
  }
};

// Thrown by ASSERT_* to leave the test body; the failure is already recorded.
struct AssertionAbort {};

inline void record_failure(const char* file, int line, const std::string& message) {
  ++current_failures();
  std::printf("%s:%d: FAILED: %s\n", file, line, message.c_str());
}

inline const char* kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kValue:
      return "kValue";
    case ErrorKind::kType:
      return "kType";
    case ErrorKind::kTimeout:
      return "kTimeout";
    case ErrorKind::kCuda:
      return "kCuda";
    case ErrorKind::kState:
      return "kState";
  }
  return "unknown";
}

template <typename T>
std::string show(const T& value) {
  if constexpr (requires(std::ostream & os) { os << value; }) {
    std::ostringstream out;
    out << value;
    return out.str();
  } else {
    return "<unprintable>";
  }
}

template <typename A, typename B, typename Compare>
bool compare(const A& a, const B& b, Compare op, const char* op_text, const char* a_text, const char* b_text,
             const char* file, int line) {
  if (op(a, b)) return true;
  record_failure(file, line,
                 std::string(a_text) + " " + op_text + " " + b_text + " (" + show(a) + " vs " + show(b) + ")");
  return false;
}

// Runs `body` and checks it throws a moelink::Error of `kind` whose message contains `substring`.
inline bool expect_throw_kind(const std::function<void()>& body, ErrorKind kind, const std::string& substring,
                              const char* expr_text, const char* file, int line) {
  try {
    body();
  } catch (const Error& e) {
    const std::string message = e.what();
    if (e.kind() != kind) {
      record_failure(
          file, line,
          std::string(expr_text) + " threw " + kind_name(e.kind()) + ", expected " + kind_name(kind) + ": " + message);
      return false;
    }
    if (message.find(substring) == std::string::npos) {
      record_failure(file, line, std::string(expr_text) + " message lacks \"" + substring + "\": " + message);
      return false;
    }
    if (message.rfind("moelink: ", 0) != 0) {
      record_failure(file, line, std::string(expr_text) + " message does not start with \"moelink: \": " + message);
      return false;
    }
    return true;
  } catch (const std::exception& e) {
    record_failure(file, line, std::string(expr_text) + " threw a non-moelink exception: " + e.what());
    return false;
  } catch (...) {
    record_failure(file, line, std::string(expr_text) + " threw an unknown exception");
    return false;
  }
  record_failure(file, line, std::string(expr_text) + " did not throw (expected " + kind_name(kind) + ")");
  return false;
}

inline bool expect_no_throw(const std::function<void()>& body, const char* expr_text, const char* file, int line) {
  try {
    body();
    return true;
  } catch (const std::exception& e) {
    record_failure(file, line, std::string(expr_text) + " threw: " + e.what());
  } catch (...) {
    record_failure(file, line, std::string(expr_text) + " threw an unknown exception");
  }
  return false;
}

inline int usage(const char* program) {
  std::printf("usage: %s [SUBSTRING | --exact NAME | --list]\n", program);
  return 2;
}

inline int run_all(int argc, char** argv) {
  const std::string first = argc > 1 ? argv[1] : "";
  if (first == "--list" && argc == 2) {
    for (const TestCase& test : registry()) std::printf("%s\n", test.name);
    return 0;
  }
  const bool exact = first == "--exact";
  if ((exact && argc != 3) || (!exact && argc > 2) || (!first.empty() && first[0] == '-' && !exact)) {
    return usage(argv[0]);
  }
  const std::string filter = exact ? argv[2] : first;
  int passed = 0;
  int failed = 0;
  for (const TestCase& test : registry()) {
    const std::string name = test.name;
    if (exact ? name != filter : name.find(filter) == std::string::npos) continue;
    current_failures() = 0;
    try {
      test.body();
    } catch (const AssertionAbort&) {
    } catch (const std::exception& e) {
      record_failure(test.file, test.line, std::string("uncaught exception: ") + e.what());
    } catch (...) {
      record_failure(test.file, test.line, "uncaught unknown exception");
    }
    if (current_failures() == 0) {
      ++passed;
    } else {
      ++failed;
      std::printf("[FAIL] %s\n", test.name);
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  if (passed + failed == 0) {
    std::printf("FAILED: no test %s \"%s\" (--list prints the names)\n", exact ? "is called" : "name contains",
                filter.c_str());
    return 1;
  }
  return failed > 0 ? 1 : 0;
}

}  // namespace moelink::testing

#define MOELINK_TEST(name)                                                                                        \
  static void moelink_test_##name();                                                                              \
  static const ::moelink::testing::Registrar moelink_test_registrar_##name(#name, &moelink_test_##name, __FILE__, \
                                                                           __LINE__);                             \
  static void moelink_test_##name()

#define MOELINK_CHECK_OR_ABORT_(ok, fatal)                            \
  do {                                                                \
    if (!(ok) && (fatal)) throw ::moelink::testing::AssertionAbort{}; \
  } while (0)

#define MOELINK_EXPECT_BOOL_(cond, want, fatal)                                                        \
  do {                                                                                                 \
    const bool moelink_ok_ = static_cast<bool>(cond) == (want);                                        \
    if (!moelink_ok_)                                                                                  \
      ::moelink::testing::record_failure(__FILE__, __LINE__,                                           \
                                         (want) ? "expected true: " #cond : "expected false: " #cond); \
    MOELINK_CHECK_OR_ABORT_(moelink_ok_, fatal);                                                       \
  } while (0)

#define MOELINK_COMPARE_(a, b, op, fatal)                                                                \
  do {                                                                                                   \
    const bool moelink_ok_ = ::moelink::testing::compare(                                                \
        (a), (b), [](const auto& x, const auto& y) { return x op y; }, #op, #a, #b, __FILE__, __LINE__); \
    MOELINK_CHECK_OR_ABORT_(moelink_ok_, fatal);                                                         \
  } while (0)

#define EXPECT_TRUE(cond) MOELINK_EXPECT_BOOL_(cond, true, false)
#define EXPECT_FALSE(cond) MOELINK_EXPECT_BOOL_(cond, false, false)
#define ASSERT_TRUE(cond) MOELINK_EXPECT_BOOL_(cond, true, true)
#define ASSERT_FALSE(cond) MOELINK_EXPECT_BOOL_(cond, false, true)
#define EXPECT_EQ(a, b) MOELINK_COMPARE_(a, b, ==, false)
#define EXPECT_NE(a, b) MOELINK_COMPARE_(a, b, !=, false)
#define EXPECT_LT(a, b) MOELINK_COMPARE_(a, b, <, false)
#define EXPECT_LE(a, b) MOELINK_COMPARE_(a, b, <=, false)
#define EXPECT_GT(a, b) MOELINK_COMPARE_(a, b, >, false)
#define EXPECT_GE(a, b) MOELINK_COMPARE_(a, b, >=, false)
#define ASSERT_EQ(a, b) MOELINK_COMPARE_(a, b, ==, true)

#define EXPECT_THROW_KIND(expr, kind, substring) \
  ::moelink::testing::expect_throw_kind([&]() { (void)(expr); }, (kind), (substring), #expr, __FILE__, __LINE__)

#define EXPECT_NO_THROW(expr) ::moelink::testing::expect_no_throw([&]() { (void)(expr); }, #expr, __FILE__, __LINE__)
