// Crash-safety testing: with MOEFORGE_FAULT_AT=N in the environment the process ends abruptly
// (_Exit with kFaultExitCode, as a kill -9 would leave things) at the Nth fault point it reaches.
// Fault points sit before and after every file-system change of a save (files written, fsyncs,
// renames, removals), so a test can stop a save at each of them and check that resume always works.
// Unset (normal runs), a fault point is one relaxed atomic load.
#pragma once

namespace moeforge::core {

constexpr int kFaultExitCode = 86;
void fault_point(const char* what);

}  // namespace moeforge::core
