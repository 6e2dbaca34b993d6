#pragma once
// The table of wait steps: every bounded wait a kernel can give up in has an id (the mode's
// contract.hpp numbers its own in its range) and a description the host puts into the
// TimeoutError. Each mode registers its steps once (a WaitStepRegistration at namespace scope in its
// host code), so decoding a device error is generic.
#include <initializer_list>

namespace moelink::runtime {

struct WaitStepInfo {
  int id;
  // Completes "rank R timed out after T s in <description> rank P, channel C)". Steps that are not
  // about a channel describe the whole wait.
  const char* description;
};

struct WaitStepRegistration {
  WaitStepRegistration(std::initializer_list<WaitStepInfo> steps);
};

// The description of `id`, or "an operation" for an id nobody registered.
const char* wait_step_description(int id);

}  // namespace moelink::runtime
