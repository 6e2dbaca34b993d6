#include "harness.hpp"

int main(int argc, char** argv) { return moelink::testing::run_all(argc, argv); }
