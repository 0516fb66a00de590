// One flat parameter buffer and one flat gradient buffer with named views
// (architecture.md §3.3): optimizer, clipping, all-reduce, checkpoints and NaN
// checks each touch one span. Modules register their tensors (NX-AI
// state_dict names and shapes) in order; offsets are fixed before allocation.
#pragma once

#include <string>
#include <unordered_map>
#include <vector>

#include "distilx/backend/memory.hpp"
#include "distilx/tensor/tensor.hpp"

namespace distilx {

struct ParamInfo {
  std::string name;  // NX-AI xLSTMLMModel state_dict key
  Shape shape;       // as in the state_dict
  index_t offset = 0;
  index_t size = 0;
  bool decay = false;  // AdamW weight decay: "weight" in the name and no "norm" (NX-AI's grouping)
};

class ParamLayout {
 public:
  /// Registers a tensor; returns its slot. Offsets are 16-element aligned (64 B for float).
  index_t add(const std::string& name, const Shape& shape) {
    DISTILX_ASSERT(index_.count(name) == 0, "duplicate parameter ", name);
    ParamInfo p;
    p.name = name;
    p.shape = shape;
    p.size = numel(shape);
    p.offset = total_;
    p.decay = name.find("weight") != std::string::npos && name.find("norm") == std::string::npos;
    total_ += (p.size + 15) / 16 * 16;
    index_[name] = static_cast<index_t>(infos_.size());
    infos_.push_back(p);
    return static_cast<index_t>(infos_.size()) - 1;
  }
  const std::vector<ParamInfo>& infos() const { return infos_; }
  const ParamInfo& operator[](index_t slot) const { return infos_[static_cast<std::size_t>(slot)]; }
  const ParamInfo* find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &infos_[static_cast<std::size_t>(it->second)];
  }
  /// Buffer length (with alignment padding).
  index_t total() const { return total_; }
  /// Number of trainable scalars (without padding).
  index_t count() const {
    index_t n = 0;
    for (const auto& p : infos_) n += p.size;
    return n;
  }

 private:
  std::vector<ParamInfo> infos_;
  std::unordered_map<std::string, index_t> index_;
  index_t total_ = 0;
};

}  // namespace distilx
