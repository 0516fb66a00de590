// The Teacher concept (architecture.md §1): whatever produces teacher logits and per-layer hidden
// states for the distiller, live (LlamaTeacher) or from an offline cache. C++17 detection idiom;
// hidden states follow HF's output_hidden_states: L+1 entries [B, S, d], embeddings first, the last
// one after the final norm.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "distilx/core/config.hpp"
#include "distilx/tensor/tensor.hpp"

namespace distilx {

namespace detail {
template <class, class = void>
struct is_teacher_impl : std::false_type {};

template <class Tc>
struct is_teacher_impl<
    Tc, std::void_t<typename Tc::value_type, typename Tc::backend_type,
                    decltype(std::declval<const Tc&>().vocab_size()), decltype(std::declval<const Tc&>().hidden_size()),
                    decltype(std::declval<const Tc&>().num_layers()),
                    decltype(std::declval<Tc&>().forward(
                        std::declval<const std::int32_t*>(), index_t{}, index_t{}, std::declval<const std::uint8_t*>(),
                        std::declval<typename Tc::value_type*>(),
                        std::declval<std::vector<Tensor<typename Tc::value_type, typename Tc::backend_type>>*>()))>>
    : std::bool_constant<std::is_convertible_v<decltype(std::declval<const Tc&>().vocab_size()), index_t> &&
                         std::is_convertible_v<decltype(std::declval<const Tc&>().hidden_size()), index_t> &&
                         std::is_convertible_v<decltype(std::declval<const Tc&>().num_layers()), index_t>> {};
}  // namespace detail

/// True when Tc models Teacher:
///   typename Tc::value_type, Tc::backend_type;
///   index_t vocab_size() const, hidden_size() const, num_layers() const;   (num_layers = L)
///   void forward(const int32_t* tokens, index_t B, index_t S, const uint8_t* attention_mask /*[B,S] or null*/,
///                value_type* logits /*[B,S,V] or null*/,
///                std::vector<Tensor<value_type, backend_type>>* hidden_states /*L+1 x [B,S,d] or null*/);
template <class Tc>
inline constexpr bool is_teacher_v = detail::is_teacher_impl<Tc>::value;

}  // namespace distilx
