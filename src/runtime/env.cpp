#include "runtime/env.hpp"

#include <cstdlib>
#include <string>

#include "runtime/errors.hpp"

namespace moelink::env {

double timeout_seconds() {
  const char* value = std::getenv("MOELINK_TIMEOUT_S");
  if (value == nullptr || *value == '\0') return 100.0;
  char* end = nullptr;
  const double seconds = std::strtod(value, &end);
  if (end == value || *end != '\0' || !(seconds > 0))
    detail::raise(ErrorKind::kValue, "MOELINK_TIMEOUT_S: expected a positive number of seconds, got '", value, "'");
  return seconds;
}

namespace {

bool flag(const char* name, bool fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  const std::string text(value);
  if (text != "0" && text != "1") detail::raise(ErrorKind::kValue, name, ": expected 0 or 1, got '", text, "'");
  return text == "1";
}

}  // namespace

bool l2_hints() {
  static const bool enabled = flag("MOELINK_L2_HINTS", true);
  return enabled;
}

bool l2_discard() {
  static const bool enabled = flag("MOELINK_L2_DISCARD", true);
  return enabled;
}

}  // namespace moelink::env
