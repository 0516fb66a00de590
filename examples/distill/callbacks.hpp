// The distilx app's Ctrl-C handling on top of the library's callbacks: the first
// Ctrl-C sets the stop flag (the run ends after the current step and saves a
// checkpoint); a second one exits at once.
#pragma once

#include <csignal>
#include <cstdlib>

#include "distilx/distill/callbacks.hpp"

namespace distilx::app {

using distilx::MetricsWriter;
using distilx::ProgressPrinter;
using distilx::truncate_metrics;

inline std::atomic<bool>& interrupted() { return stop_flag(); }
extern "C" inline void on_sigint(int) {
  if (stop_flag().exchange(true)) std::_Exit(130);
}

}  // namespace distilx::app
