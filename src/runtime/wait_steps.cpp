#include "runtime/wait_steps.hpp"

#include <mutex>
#include <vector>

namespace moelink::runtime {

namespace {

// A function-local table: registrations run during static initialization of other translation
// units, in no defined order.
struct Table {
  std::mutex mutex;
  std::vector<WaitStepInfo> steps;
};

Table& table() {
  static Table t;
  return t;
}

}  // namespace

WaitStepRegistration::WaitStepRegistration(std::initializer_list<WaitStepInfo> steps) {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mutex);
  t.steps.insert(t.steps.end(), steps.begin(), steps.end());
}

const char* wait_step_description(int id) {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mutex);
  for (const WaitStepInfo& s : t.steps)
    if (s.id == id) return s.description;
  return "an operation";
}

}  // namespace moelink::runtime
