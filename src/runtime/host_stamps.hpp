#pragma once
// Probe only (not a knob users set; docs/KNOBS.md): MOELINK_HOST_STAMPS=DIR splits the host path of the calls
// that carry stamps into phases and writes the median and mean µs of each to DIR/host_stamps_PID.txt
// every 256 marks. Unset, a stamp costs one load of a static bool.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

namespace moelink::host_stamps {

struct Phase {
  const char* name;
  std::vector<float> us;
};

struct State {
  const char* dir = std::getenv("MOELINK_HOST_STAMPS");
  std::chrono::steady_clock::time_point last{};
  std::vector<Phase> phases;
  long marks = 0;
};

inline State& state() {
  static State s;
  return s;
}

inline bool on() {
  static const bool enabled = state().dir != nullptr && *state().dir != '\0';
  return enabled;
}

inline void dump(State& s) {
  const std::string path = std::string(s.dir) + "/host_stamps_" + std::to_string(getpid()) + ".txt";
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) return;
  for (const Phase& p : s.phases) {
    std::vector<float> v = p.us;
    std::sort(v.begin(), v.end());
    double sum = 0;
    for (float x : v) sum += x;
    std::fprintf(f, "%-32s median %8.2f us  mean %8.2f  (%zu calls)\n", p.name, v[v.size() / 2], sum / v.size(),
                 v.size());
  }
  std::fclose(f);
}

// The start of a call's path: the next mark measures from here.
inline void begin() {
  if (on()) state().last = std::chrono::steady_clock::now();
}

// The time since the previous mark (or begin) goes to `phase` (a string literal).
inline void mark(const char* phase) {
  if (!on()) return;
  State& s = state();
  const auto now = std::chrono::steady_clock::now();
  const double us = std::chrono::duration<double, std::micro>(now - s.last).count();
  s.last = now;
  Phase* p = nullptr;
  for (Phase& q : s.phases)
    if (q.name == phase) p = &q;
  if (!p) {
    s.phases.push_back({phase, {}});
    p = &s.phases.back();
  }
  p->us.push_back(static_cast<float>(us));
  if (++s.marks % 256 == 0) dump(s);
}

}  // namespace moelink::host_stamps
