// Tests for distilx/io/dtype.hpp and distilx/io/safetensors.hpp: 16-bit float
// bit patterns, writer/reader round trips, byte-exact compatibility with files
// the Python safetensors library writes, header validation and atomic writes.
#include <boost/test/unit_test.hpp>

#include "test_util.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "distilx/io/safetensors.hpp"

namespace fs = std::filesystem;
using namespace distilx;
using namespace distilx::io;

namespace {

/// TempDir with this suite's prefix (the helpers live in test_util.hpp).
struct TempDir : test_util::TempDir {
  TempDir() : test_util::TempDir("distilx_st") {}
};
using test_util::slurp;
using test_util::spit;

std::string le64(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return s;
}

/// length field + header (space-padded to a multiple of 8 when `pad`) + data.
std::string assemble(std::string header, const std::string& data, bool pad = true) {
  if (pad) header.append((8 - header.size() % 8) % 8, ' ');
  return le64(header.size()) + header + data;
}

std::string f32_bytes(std::initializer_list<float> v) {
  std::string s;
  for (float x : v) {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>((u >> (8 * i)) & 0xFF));
  }
  return s;
}

/// Runs fn, which must throw io_error whose message contains every one of `parts`.
void expect_io_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    BOOST_ERROR("expected io_error, nothing was thrown");
  } catch (const io_error& e) {
    const std::string what = e.what();
    for (const auto& p : parts) BOOST_CHECK_MESSAGE(what.find(p) != std::string::npos, "'" << p << "' not in: " << what);
  }
}

/// Writes a hand-made file and expects opening it to fail with the given message parts.
void expect_bad_file(const TempDir& t, const std::string& bytes, std::vector<std::string> parts) {
  const std::string p = t.file("bad.safetensors");
  spit(p, bytes);
  parts.push_back(p);  // every message names the file
  expect_io_error([&] { SafetensorsFile f(p); }, parts);
}

float ldexpf_(int m, int e) { return std::ldexp(static_cast<float>(m), e); }

}  // namespace

BOOST_AUTO_TEST_SUITE(safetensors)

// ---------------------------------------------------------------- dtypes

BOOST_AUTO_TEST_CASE(dtype_names_sizes_and_mapping) {
  BOOST_CHECK_EQUAL(dtype_size(DType::bf16), 2u);
  BOOST_CHECK_EQUAL(dtype_size(DType::i64), 8u);
  BOOST_CHECK_EQUAL(dtype_size(DType::boolean), 1u);
  BOOST_CHECK_EQUAL(std::string(dtype_name(DType::bf16)), "BF16");
  BOOST_CHECK_EQUAL(std::string(dtype_name(DType::boolean)), "BOOL");
  for (DType t : {DType::f64, DType::f32, DType::f16, DType::bf16, DType::i64, DType::i32, DType::u32, DType::i16,
                  DType::u16, DType::i8, DType::u8, DType::boolean})
    BOOST_CHECK(dtype_from_name(dtype_name(t)) == t);
  expect_io_error([] { dtype_from_name("float32"); }, {"\"float32\""});
  BOOST_CHECK(dtype_of<double>() == DType::f64);
  BOOST_CHECK(dtype_of<float>() == DType::f32);
  BOOST_CHECK(dtype_of<std::int64_t>() == DType::i64);
  BOOST_CHECK(dtype_of<long long>() == DType::i64);
  BOOST_CHECK(dtype_of<std::int32_t>() == DType::i32);
  BOOST_CHECK(dtype_of<std::uint32_t>() == DType::u32);
  BOOST_CHECK(dtype_of<std::int16_t>() == DType::i16);
  BOOST_CHECK(dtype_of<std::uint16_t>() == DType::u16);
  BOOST_CHECK(dtype_of<std::int8_t>() == DType::i8);
  BOOST_CHECK(dtype_of<std::uint8_t>() == DType::u8);
  BOOST_CHECK(dtype_of<bool>() == DType::boolean);
}

BOOST_AUTO_TEST_CASE(bf16_known_bit_patterns) {
  BOOST_CHECK_EQUAL(float_to_bf16(1.0f), 0x3F80);
  BOOST_CHECK_EQUAL(bf16_to_float(0x3F80), 1.0f);
  BOOST_CHECK_EQUAL(float_to_bf16(-2.0f), 0xC000);
  BOOST_CHECK_EQUAL(float_to_bf16(0.0f), 0x0000);
  BOOST_CHECK_EQUAL(float_to_bf16(-0.0f), 0x8000);
  // Ties round to even: 1 + 2^-8 lies halfway between 0x3F80 and 0x3F81.
  BOOST_CHECK_EQUAL(float_to_bf16(1.0f + ldexpf_(1, -8)), 0x3F80);
  BOOST_CHECK_EQUAL(float_to_bf16(1.0f + ldexpf_(3, -8)), 0x3F82);
  BOOST_CHECK_EQUAL(float_to_bf16(1.0f + ldexpf_(1, -8) + ldexpf_(1, -20)), 0x3F81);  // above the tie
  BOOST_CHECK_EQUAL(float_to_bf16(1.0f + ldexpf_(1, -9)), 0x3F80);                    // below the tie
  BOOST_CHECK_EQUAL(float_to_bf16(std::numeric_limits<float>::infinity()), 0x7F80);
  BOOST_CHECK_EQUAL(float_to_bf16(-std::numeric_limits<float>::infinity()), 0xFF80);
  BOOST_CHECK_EQUAL(float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds up past the max
  BOOST_CHECK(std::isinf(bf16_to_float(0x7F80)));
  BOOST_CHECK_EQUAL(bf16_to_float(0x0001), std::ldexp(1.0f, -133));  // smallest bf16 subnormal
  const std::uint16_t qnan = float_to_bf16(std::numeric_limits<float>::quiet_NaN());
  BOOST_CHECK(std::isnan(bf16_to_float(qnan)));
  // A NaN whose payload sits only in the discarded low bits must not become infinity.
  const std::uint32_t snan_bits = 0x7F800001u;
  float snan;
  std::memcpy(&snan, &snan_bits, 4);
  BOOST_CHECK(std::isnan(bf16_to_float(float_to_bf16(snan))));
  // Correct rounding from double, not double -> float -> bf16 (which would hit the tie).
  BOOST_CHECK_EQUAL(double_to_bf16(1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40)), 0x3F81);
  BOOST_CHECK_EQUAL(double_to_bf16(1.0 + std::ldexp(1.0, -8)), 0x3F80);
}

BOOST_AUTO_TEST_CASE(f16_known_bit_patterns) {
  BOOST_CHECK_EQUAL(float_to_f16(1.0f), 0x3C00);
  BOOST_CHECK_EQUAL(f16_to_float(0x3C00), 1.0f);
  BOOST_CHECK_EQUAL(float_to_f16(-2.0f), 0xC000);
  BOOST_CHECK_EQUAL(float_to_f16(0.1f), 0x2E66);
  BOOST_CHECK_EQUAL(float_to_f16(-0.0f), 0x8000);
  BOOST_CHECK_EQUAL(float_to_f16(65504.0f), 0x7BFF);
  BOOST_CHECK_EQUAL(f16_to_float(0x7BFF), 65504.0f);
  BOOST_CHECK_EQUAL(float_to_f16(65519.0f), 0x7BFF);  // below the tie with 65536
  BOOST_CHECK_EQUAL(float_to_f16(65520.0f), 0x7C00);  // tie rounds to the even encoding: inf
  BOOST_CHECK_EQUAL(float_to_f16(1e6f), 0x7C00);
  // Subnormals: 2^-24 is the smallest, 2^-14 the smallest normal.
  BOOST_CHECK_EQUAL(float_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  BOOST_CHECK_EQUAL(f16_to_float(0x0001), std::ldexp(1.0f, -24));
  BOOST_CHECK_EQUAL(f16_to_float(0x03FF), std::ldexp(1023.0f, -24));
  BOOST_CHECK_EQUAL(float_to_f16(std::ldexp(1023.0f, -24)), 0x03FF);
  BOOST_CHECK_EQUAL(float_to_f16(std::ldexp(1.0f, -14)), 0x0400);
  BOOST_CHECK_EQUAL(f16_to_float(0x8001), -std::ldexp(1.0f, -24));
  BOOST_CHECK_EQUAL(float_to_f16(std::ldexp(1.0f, -25)), 0x0000);                // tie -> even (0)
  BOOST_CHECK_EQUAL(float_to_f16(std::ldexp(1.0f, -25) * 1.0001f), 0x0001);      // just above the tie
  BOOST_CHECK_EQUAL(float_to_f16(std::ldexp(3.0f, -25)), 0x0002);                // tie between 1 and 2 -> 2
  BOOST_CHECK_EQUAL(float_to_f16(std::ldexp(2047.0f, -25)), 0x0400);             // rounds up into the normals
  BOOST_CHECK_EQUAL(float_to_f16(1e-10f), 0x0000);
  BOOST_CHECK_EQUAL(float_to_f16(-1e-10f), 0x8000);
  BOOST_CHECK_EQUAL(float_to_f16(std::numeric_limits<float>::denorm_min()), 0x0000);
  // Normal-range ties.
  BOOST_CHECK_EQUAL(float_to_f16(1.0f + ldexpf_(1, -11)), 0x3C00);
  BOOST_CHECK_EQUAL(float_to_f16(1.0f + ldexpf_(3, -11)), 0x3C02);
  BOOST_CHECK_EQUAL(float_to_f16(std::numeric_limits<float>::infinity()), 0x7C00);
  BOOST_CHECK_EQUAL(float_to_f16(-std::numeric_limits<float>::infinity()), 0xFC00);
  BOOST_CHECK(std::isinf(f16_to_float(0xFC00)) && f16_to_float(0xFC00) < 0);
  const std::uint16_t hn = float_to_f16(std::numeric_limits<float>::quiet_NaN());
  BOOST_CHECK_EQUAL(hn & 0x7C00, 0x7C00);
  BOOST_CHECK_NE(hn & 0x03FF, 0);
  BOOST_CHECK(std::isnan(f16_to_float(0x7E00)));
  BOOST_CHECK(std::isnan(f16_to_float(0x7C01)));
  BOOST_CHECK_EQUAL(double_to_f16(1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40)), 0x3C01);
  BOOST_CHECK_EQUAL(double_to_f16(1.0 + std::ldexp(1.0, -11)), 0x3C00);
  BOOST_CHECK_EQUAL(double_to_f16(1e300), 0x7C00);
}

BOOST_AUTO_TEST_CASE(sixteen_bit_formats_round_trip_every_pattern) {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const auto b = static_cast<std::uint16_t>(h);
    const float fb = bf16_to_float(b), fh = f16_to_float(b);
    if (std::isnan(fb)) BOOST_REQUIRE(std::isnan(bf16_to_float(float_to_bf16(fb))));
    else BOOST_REQUIRE_EQUAL(float_to_bf16(fb), b);
    if (std::isnan(fh)) BOOST_REQUIRE(std::isnan(f16_to_float(float_to_f16(fh))));
    else BOOST_REQUIRE_EQUAL(float_to_f16(fh), b);
  }
}

BOOST_AUTO_TEST_CASE(narrowing_picks_a_nearest_neighbour) {
  // For random floats the encoded value must be at least as close as both adjacent encodings.
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> ex(-26, 15);
  for (int k = 0; k < 20000; ++k) {
    const float x = std::ldexp(mant(rng), ex(rng));
    const std::uint16_t hb = float_to_bf16(x), hh = float_to_f16(x);
    const double db = std::abs(double(bf16_to_float(hb)) - x), dh = std::abs(double(f16_to_float(hh)) - x);
    BOOST_REQUIRE_LE(db, std::abs(double(bf16_to_float(hb + 1)) - x));
    if (hb > 0) BOOST_REQUIRE_LE(db, std::abs(double(bf16_to_float(hb - 1)) - x));
    if (hh < 0x7BFF) BOOST_REQUIRE_LE(dh, std::abs(double(f16_to_float(hh + 1)) - x));
    if (hh > 0 && hh < 0x7C00) BOOST_REQUIRE_LE(dh, std::abs(double(f16_to_float(hh - 1)) - x));
  }
}

// ---------------------------------------------------------------- round trips

BOOST_AUTO_TEST_CASE(round_trip_types_metadata_and_order) {
  TempDir t;
  const std::vector<double> d = {1.5, -2.25, 3.0e100, 0.0, -0.0, 1e-300};
  const std::vector<float> f = {0.5f, -1.25f, 3.0f, 1e-30f};
  const std::vector<std::int64_t> l = {std::numeric_limits<std::int64_t>::min(), -1, (std::int64_t(1) << 40)};
  const std::vector<std::int32_t> i = {7, -8, 2147483647, 0};
  SafetensorsWriter w;
  // Insertion order deliberately differs from alphabetical order.
  w.add("zeta.double", {2, 3}, d.data());
  w.add("alpha.float", {4}, f.data());
  w.add("mid.long", {3}, l.data());
  w.add("beta.int", {2, 2}, i.data());
  w.set_metadata("format", "pt");
  w.set_metadata("step", "12");
  const std::string p = t.file("model.safetensors");
  w.write(p);

  const std::string bytes = slurp(p);
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  BOOST_CHECK_EQUAL(n % 8, 0u);  // data section starts 8-byte aligned
  BOOST_CHECK_EQUAL(bytes.size(), 8 + n + 48 + 16 + 24 + 16);

  SafetensorsFile r(p);
  BOOST_CHECK_EQUAL(r.path(), p);
  BOOST_CHECK_EQUAL(r.size(), 4u);
  BOOST_CHECK((r.names() == std::vector<std::string>{"zeta.double", "alpha.float", "mid.long", "beta.int"}));
  BOOST_CHECK_EQUAL(r.metadata().size(), 2u);
  BOOST_CHECK_EQUAL(r.metadata().at("format"), "pt");
  BOOST_CHECK_EQUAL(r.metadata().at("step"), "12");
  BOOST_CHECK(r.contains("mid.long"));
  BOOST_CHECK(!r.contains("nope"));

  const TensorInfo& zi = r.info("zeta.double");
  BOOST_CHECK(zi.dtype == DType::f64);
  BOOST_CHECK((zi.shape == Shape{2, 3}));
  BOOST_CHECK_EQUAL(zi.numel(), 6);
  BOOST_CHECK_EQUAL(zi.begin, 8 + n);
  BOOST_CHECK_EQUAL(zi.end - zi.begin, 48u);
  BOOST_CHECK(r.info("beta.int").dtype == DType::i32);
  BOOST_CHECK(r.info("alpha.float").dtype == DType::f32);

  const auto d2 = r.read<double>("zeta.double");
  BOOST_CHECK_EQUAL_COLLECTIONS(d2.begin(), d2.end(), d.begin(), d.end());
  BOOST_CHECK(std::signbit(d2[4]));
  const auto f2 = r.read<float>("alpha.float");
  BOOST_CHECK_EQUAL_COLLECTIONS(f2.begin(), f2.end(), f.begin(), f.end());
  const auto l2 = r.read<std::int64_t>("mid.long");
  BOOST_CHECK_EQUAL_COLLECTIONS(l2.begin(), l2.end(), l.begin(), l.end());
  std::vector<std::int32_t> i2(4);
  r.read("beta.int", i2.data(), Shape{2, 2});
  BOOST_CHECK_EQUAL_COLLECTIONS(i2.begin(), i2.end(), i.begin(), i.end());
  BOOST_CHECK_EQUAL(std::memcmp(r.raw("alpha.float"), f.data(), 16), 0);

  // Conversions on read: f32 -> double, i32 -> float and -> int64.
  std::vector<double> fd(4);
  r.read("alpha.float", fd.data(), index_t(4));
  for (std::size_t k = 0; k < 4; ++k) BOOST_CHECK_EQUAL(fd[k], double(f[k]));
  const auto ifl = r.read<float>("beta.int");
  BOOST_CHECK_EQUAL(ifl[2], 2147483648.0f);
  const auto il = r.read<std::int64_t>("beta.int");
  BOOST_CHECK_EQUAL_COLLECTIONS(il.begin(), il.end(), i.begin(), i.end());

  // A moved-from reader hands its mapping over intact.
  SafetensorsFile moved(std::move(r));
  BOOST_CHECK_EQUAL(moved.read<double>("zeta.double")[0], 1.5);
  SafetensorsFile other(p);
  other = std::move(moved);
  BOOST_CHECK_EQUAL(other.read<std::int32_t>("beta.int")[1], -8);
}

BOOST_AUTO_TEST_CASE(small_integer_and_bool_round_trip) {
  TempDir t;
  const bool b[] = {true, false, true};
  const std::int8_t i8[] = {-128, 127, 0};
  const std::uint8_t u8[] = {255, 0, 1};
  const std::int16_t i16[] = {-32768, 32767};
  const std::uint16_t u16[] = {65535, 1};
  const std::uint32_t u32[] = {4294967295u, 2};
  SafetensorsWriter w;
  w.add("b", {3}, b);
  w.add("i8", {3}, i8);
  w.add("u8", {3}, u8);
  w.add("i16", {2}, i16);
  w.add("u16", {2}, u16);
  w.add("u32", {2}, u32);
  w.write(t.file("s.safetensors"));
  SafetensorsFile r(t.file("s.safetensors"));
  BOOST_CHECK(r.info("b").dtype == DType::boolean);
  BOOST_CHECK((r.read<bool>("b") == std::vector<bool>{true, false, true}));
  BOOST_CHECK((r.read<std::int8_t>("i8") == std::vector<std::int8_t>{-128, 127, 0}));
  BOOST_CHECK((r.read<std::uint8_t>("u8") == std::vector<std::uint8_t>{255, 0, 1}));
  BOOST_CHECK((r.read<std::int16_t>("i16") == std::vector<std::int16_t>{-32768, 32767}));
  BOOST_CHECK((r.read<std::uint16_t>("u16") == std::vector<std::uint16_t>{65535, 1}));
  BOOST_CHECK((r.read<std::uint32_t>("u32") == std::vector<std::uint32_t>{4294967295u, 2}));
  BOOST_CHECK((r.read<double>("i8") == std::vector<double>{-128, 127, 0}));
  BOOST_CHECK((r.read<std::uint64_t>("u32") == std::vector<std::uint64_t>{4294967295u, 2}));
  BOOST_CHECK((r.read<float>("b") == std::vector<float>{1, 0, 1}));
}

BOOST_AUTO_TEST_CASE(bf16_and_f16_files_read_back_within_precision) {
  TempDir t;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  std::vector<float> x(1000);
  for (auto& v : x) v = u(rng);
  x[0] = 1.0f;
  x[1] = -0.0f;
  x[2] = 1e-3f;
  std::vector<double> xd(x.begin(), x.end());
  SafetensorsWriter w;
  w.add_as("w.bf16", DType::bf16, {10, 100}, x.data());
  w.add_as("w.f16", DType::f16, {10, 100}, x.data());
  w.add_as("w.f16_from_double", DType::f16, {1000}, xd.data());
  w.add_as("w.f32_from_double", DType::f32, {1000}, xd.data());
  w.add_as("w.f64_from_float", DType::f64, {1000}, x.data());
  w.write(t.file("h.safetensors"));

  SafetensorsFile r(t.file("h.safetensors"));
  BOOST_CHECK(r.info("w.bf16").dtype == DType::bf16);
  BOOST_CHECK(r.info("w.f16").dtype == DType::f16);
  BOOST_CHECK_EQUAL(r.info("w.bf16").end - r.info("w.bf16").begin, 2000u);
  const auto b = r.read<float>("w.bf16");
  const auto h = r.read<float>("w.f16");
  const auto hd = r.read<double>("w.f16_from_double");
  const auto* raw_b = static_cast<const unsigned char*>(r.raw("w.bf16"));
  const auto* raw_h = static_cast<const unsigned char*>(r.raw("w.f16"));
  for (std::size_t k = 0; k < x.size(); ++k) {
    // Half an ulp: 2^-8 relative for bf16 (8 significant bits), 2^-11 for f16 (11 bits).
    BOOST_REQUIRE_LE(std::abs(b[k] - x[k]), std::abs(x[k]) * std::ldexp(1.0f, -8));
    BOOST_REQUIRE_LE(std::abs(h[k] - x[k]), std::abs(x[k]) * std::ldexp(1.0f, -11) + std::ldexp(1.0f, -25));
    BOOST_REQUIRE_EQUAL(hd[k], double(h[k]));
    // Stored bits are exactly the documented conversion, little-endian.
    BOOST_REQUIRE_EQUAL(raw_b[2 * k] | (raw_b[2 * k + 1] << 8), float_to_bf16(x[k]));
    BOOST_REQUIRE_EQUAL(raw_h[2 * k] | (raw_h[2 * k + 1] << 8), float_to_f16(x[k]));
  }
  BOOST_CHECK_EQUAL(b[0], 1.0f);
  BOOST_CHECK(std::signbit(h[1]));
  const auto f32 = r.read<float>("w.f32_from_double");
  BOOST_CHECK_EQUAL_COLLECTIONS(f32.begin(), f32.end(), x.begin(), x.end());
  const auto f64 = r.read<double>("w.f64_from_float");
  BOOST_CHECK_EQUAL_COLLECTIONS(f64.begin(), f64.end(), xd.begin(), xd.end());
}

BOOST_AUTO_TEST_CASE(empty_tensors_and_empty_file) {
  TempDir t;
  SafetensorsWriter none;
  // No tensors: "{}" padded to 8 bytes, as the Python library writes it.
  BOOST_CHECK(none.serialize() == (std::vector<unsigned char>{8, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ', ' ', ' ', ' ', ' '}));
  none.write(t.file("none.safetensors"));
  SafetensorsFile r0(t.file("none.safetensors"));
  BOOST_CHECK(r0.names().empty());
  BOOST_CHECK(r0.metadata().empty());

  SafetensorsWriter w;
  const float one = 3.0f;
  w.add<float>("empty", {0, 5}, nullptr);
  w.add("scalar", {}, &one);
  w.add<float>("empty2", {0}, nullptr);
  w.write(t.file("e.safetensors"));
  SafetensorsFile r(t.file("e.safetensors"));
  BOOST_CHECK(r.read<float>("empty").empty());
  BOOST_CHECK((r.info("empty").shape == Shape{0, 5}));
  BOOST_CHECK((r.read<float>("scalar") == std::vector<float>{3.0f}));
  BOOST_CHECK(r.info("scalar").shape.empty());
  BOOST_CHECK_EQUAL(r.names().size(), 3u);
}

// ---------------------------------------------------------------- Python compatibility

// What `save_file({"weight": torch.tensor([[1., 2.], [3., 4.]]), "bias": torch.tensor([.5, -.5])},
// path, metadata={"format": "pt"})` writes: compact JSON with "__metadata__" first, tensors sorted
// by dtype alignment then name, data packed from offset 0, header padded with spaces to 152 bytes.
BOOST_AUTO_TEST_CASE(reads_and_writes_python_layout_byte_exact) {
  TempDir t;
  std::string header =
      R"({"__metadata__":{"format":"pt"},"bias":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("weight":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}})";
  BOOST_REQUIRE_EQUAL(header.size(), 149u);
  const std::string file = std::string("\x98\0\0\0\0\0\0\0", 8) + header + "   " +
                           std::string("\0\0\0\x3f\0\0\0\xbf", 8) +                     // bias: 0.5, -0.5
                           std::string("\0\0\x80\x3f\0\0\0\x40\0\0\x40\x40\0\0\x80\x40", 16);  // 1, 2, 3, 4
  BOOST_REQUIRE_EQUAL(file.size(), 8u + 152u + 24u);
  const std::string p = t.file("py.safetensors");
  spit(p, file);

  SafetensorsFile r(p);
  BOOST_CHECK((r.names() == std::vector<std::string>{"bias", "weight"}));
  BOOST_CHECK_EQUAL(r.metadata().at("format"), "pt");
  BOOST_CHECK((r.read<float>("bias") == std::vector<float>{0.5f, -0.5f}));
  std::vector<float> wv(4);
  r.read("weight", wv.data(), Shape{2, 2});
  BOOST_CHECK((wv == std::vector<float>{1, 2, 3, 4}));
  BOOST_CHECK_EQUAL(r.info("weight").begin, 8u + 152u + 8u);

  // Our writer, given the tensors in the Python order, produces the identical bytes.
  SafetensorsWriter w;
  const float bias[] = {0.5f, -0.5f}, weight[] = {1, 2, 3, 4};
  w.add("bias", {2}, bias);
  w.add("weight", {2, 2}, weight);
  w.set_metadata("format", "pt");
  const auto ser = w.serialize();
  BOOST_CHECK(std::string(ser.begin(), ser.end()) == file);
  w.write(t.file("ours.safetensors"));
  BOOST_CHECK(slurp(t.file("ours.safetensors")) == file);
}

// Python layout with mixed dtypes: I64 sorts before BF16, a 0-d scalar has shape [].
BOOST_AUTO_TEST_CASE(reads_python_layout_with_scalar_and_bf16) {
  TempDir t;
  const std::string header =
      R"({"step":{"dtype":"I64","shape":[],"data_offsets":[0,8]},"emb":{"dtype":"BF16","shape":[3],"data_offsets":[8,14]}})";
  BOOST_REQUIRE_EQUAL(header.size(), 113u);
  const std::string file = std::string("\x78\0\0\0\0\0\0\0", 8) + header + std::string(7, ' ') +
                           std::string("\x07\0\0\0\0\0\0\0", 8) + std::string("\x80\x3f\x00\xc0\x00\x3f", 6);
  spit(t.file("py2.safetensors"), file);
  SafetensorsFile r(t.file("py2.safetensors"));
  BOOST_CHECK((r.names() == std::vector<std::string>{"step", "emb"}));
  BOOST_CHECK((r.read<float>("emb") == std::vector<float>{1.0f, -2.0f, 0.5f}));
  BOOST_CHECK((r.read<double>("emb") == std::vector<double>{1.0, -2.0, 0.5}));
  std::int64_t step = 0;
  r.read("step", &step, Shape{});
  BOOST_CHECK_EQUAL(step, 7);
  BOOST_CHECK_EQUAL(r.read<std::int32_t>("step").at(0), 7);
  BOOST_CHECK(r.metadata().empty());
}

BOOST_AUTO_TEST_CASE(names_follow_offsets_and_unaligned_data_reads) {
  TempDir t;
  // JSON keys sort alphabetically, offsets put "z" first; no header padding, so the data
  // section starts at an odd address and every load is unaligned.
  const std::string header =
      R"({"a":{"dtype":"F64","shape":[1],"data_offsets":[4,12]},"z":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})";
  std::string data = std::string("\xfe\xff\xff\xff", 4);  // -2
  const double v = -1.75;
  data.append(reinterpret_cast<const char*>(&v), 8);
  const std::string bytes = assemble(header, data, /*pad=*/false);
  BOOST_REQUIRE_NE(header.size() % 8, 0u);
  spit(t.file("u.safetensors"), bytes);
  SafetensorsFile r(t.file("u.safetensors"));
  BOOST_CHECK((r.names() == std::vector<std::string>{"z", "a"}));
  BOOST_CHECK_EQUAL(r.read<std::int32_t>("z").at(0), -2);
  BOOST_CHECK_EQUAL(r.read<double>("a").at(0), -1.75);
  BOOST_CHECK_EQUAL(r.read<float>("a").at(0), -1.75f);
}

// ---------------------------------------------------------------- validation

BOOST_AUTO_TEST_CASE(rejects_unreadable_and_truncated_files) {
  TempDir t;
  expect_io_error([&] { SafetensorsFile f(t.file("missing.safetensors")); },
                  {t.file("missing.safetensors"), "cannot open", std::strerror(ENOENT)});
  expect_io_error([&] { SafetensorsFile f(t.dir.string()); }, {t.dir.string(), "not a regular file"});
  expect_bad_file(t, std::string("\x05\0\0\0\0", 5), {"5 bytes", "shorter than the 8-byte"});
  expect_bad_file(t, std::string(), {"0 bytes"});
  expect_bad_file(t, le64(1000) + "{}        ", {"header length 1000", "runs past the end", "10 bytes"});
  expect_bad_file(t, le64(200'000'000) + "{}        ", {"200000000", "exceeds the limit of 100000000"});
  expect_bad_file(t, le64(~std::uint64_t(0)) + "{}", {"header length 18446744073709551615"});
}

BOOST_AUTO_TEST_CASE(rejects_malformed_headers) {
  TempDir t;
  const std::string f8 = f32_bytes({1, 2});
  expect_bad_file(t, assemble("{not json", ""), {"not valid JSON"});
  expect_bad_file(t, assemble("", ""), {"not valid JSON"});
  expect_bad_file(t, assemble("[1,2]", ""), {"JSON object", "array"});
  expect_bad_file(t, assemble(R"({"w":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})", f8),
                  {"tensor 'w'", "\"F17\""});
  expect_bad_file(t, assemble(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", f8), {"tensor 'w'", "dtype"});
  expect_bad_file(t, assemble(R"({"w":{"dtype":7,"shape":[2],"data_offsets":[0,8]}})", f8), {"tensor 'w'", "dtype"});
  expect_bad_file(t, assemble(R"({"w":5})", f8), {"tensor 'w'", "must be an object", "number"});
  // shape
  expect_bad_file(t, assemble(R"({"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", f8),
                  {"tensor 'w'", "\"shape\" must be an array of non-negative integers", "found 2"});
  expect_bad_file(t, assemble(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", f8), {"tensor 'w'", "\"shape\""});
  expect_bad_file(t, assemble(R"({"w":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,8]}})", f8),
                  {"tensor 'w'", "non-negative", "[2,-1]"});
  expect_bad_file(t, assemble(R"({"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", f8),
                  {"tensor 'w'", "non-negative integers"});
  expect_bad_file(t, assemble(R"({"w":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", f8),
                  {"tensor 'w'", "non-negative integers"});
  expect_bad_file(t,
                  assemble(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,8]}})", f8),
                  {"tensor 'w'", "overflows"});
  // data_offsets
  expect_bad_file(t, assemble(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8]}})", f8),
                  {"tensor 'w'", "\"data_offsets\" must be [begin, end]", "[8]"});
  expect_bad_file(t, assemble(R"({"w":{"dtype":"F32","shape":[2]}})", f8), {"tensor 'w'", "data_offsets"});
  expect_bad_file(t, assemble(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", f8),
                  {"tensor 'w'", "data_offsets"});
  expect_bad_file(t, assemble(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", f8),
                  {"tensor 'w'", "[8, 0]", "begin > end"});
  // size and bounds
  expect_bad_file(t, assemble(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", f8 + f8),
                  {"tensor 'w'", "span 12 bytes", "[2, 2]", "F32", "16 bytes"});
  expect_bad_file(t, assemble(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", f8),
                  {"tensor 'w'", "[0, 16]", "past the end", "8 bytes"});
  expect_bad_file(t, assemble(R"({"w":{"dtype":"BF16","shape":[5],"data_offsets":[0,10]}})", f8),
                  {"tensor 'w'", "past the end"});
  // overlapping ranges (empty ranges never overlap)
  expect_bad_file(t,
                  assemble(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                           f8 + f8),
                  {"overlap", "'a' [0, 8]", "'b' [4, 12]"});
  expect_bad_file(t,
                  assemble(R"({"big":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                           R"("in":{"dtype":"U8","shape":[1],"data_offsets":[15,16]},)"
                           R"("x":{"dtype":"U8","shape":[1],"data_offsets":[3,4]}})",
                           f8 + f8),
                  {"overlap", "'big'"});
  {
    const std::string ok = assemble(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                    R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                                    f8);
    spit(t.file("ok.safetensors"), ok);
    BOOST_CHECK_NO_THROW(SafetensorsFile(t.file("ok.safetensors")));
  }
  // __metadata__
  expect_bad_file(t, assemble(R"({"__metadata__":"pt"})", ""), {"__metadata__", "object of strings", "string"});
  expect_bad_file(t, assemble(R"({"__metadata__":{"format":"pt","epoch":3}})", ""),
                  {"__metadata__", "'epoch'", "number"});
}

BOOST_AUTO_TEST_CASE(read_errors_name_tensor_and_both_shapes) {
  TempDir t;
  SafetensorsWriter w;
  const float f[] = {1, 2, 3, 4};
  const std::int64_t big[] = {std::int64_t(1) << 40, 1};
  const std::int32_t neg[] = {-1};
  w.add("w", {2, 2}, f);
  w.add("big", {2}, big);
  w.add("neg", {1}, neg);
  const std::string p = t.file("r.safetensors");
  w.write(p);
  SafetensorsFile r(p);
  std::vector<float> dst(8);
  expect_io_error([&] { r.read("w", dst.data(), index_t(5)); },
                  {p, "tensor 'w'", "expected 5 elements", "found shape [2, 2]", "(4 elements)"});
  expect_io_error([&] { r.read("w", dst.data(), Shape{4}); },
                  {p, "tensor 'w'", "expected shape [4]", "found shape [2, 2]"});
  expect_io_error([&] { r.read("w", dst.data(), Shape{2, 2, 1}); }, {"expected shape [2, 2, 1]"});
  expect_io_error([&] { r.info("nope"); }, {p, "tensor 'nope'", "no such tensor"});
  expect_io_error([&] { r.read<float>("nope"); }, {"tensor 'nope'"});
  expect_io_error([&] { r.raw("nope"); }, {"tensor 'nope'"});
  expect_io_error([&] { r.read<int>("w"); }, {"tensor 'w'", "F32", "integer type"});
  expect_io_error([&] { r.read<std::int32_t>("big"); }, {"tensor 'big'", "1099511627776", "does not fit"});
  expect_io_error([&] { r.read<std::uint32_t>("neg"); }, {"tensor 'neg'", "-1", "does not fit"});
  expect_io_error([&] { r.read<bool>("big"); }, {"tensor 'big'", "bool"});
  BOOST_CHECK_EQUAL(r.read<double>("big")[0], 1099511627776.0);
}

// ---------------------------------------------------------------- writer

BOOST_AUTO_TEST_CASE(writer_rejects_bad_tensors) {
  SafetensorsWriter w;
  const float f[] = {1, 2};
  w.add("a", {2}, f);
  expect_io_error([&] { w.add("a", {2}, f); }, {"duplicate", "'a'"});
  expect_io_error([&] { w.add("__metadata__", {2}, f); }, {"__metadata__"});
  expect_io_error([&] { w.add_as("c", DType::i32, {2}, f); }, {"tensor 'c'", "I32"});
  BOOST_CHECK_THROW(w.add_raw("d", DType::f32, {3}, f, 8), shape_error);
  BOOST_CHECK_THROW(w.add("e", {-2}, f), shape_error);
  BOOST_CHECK_EQUAL(w.size(), 1u);  // failed adds leave nothing behind
  w.add_raw("d", DType::bf16, {4}, f, 8);
  BOOST_CHECK_EQUAL(w.size(), 2u);
}

BOOST_AUTO_TEST_CASE(writer_missing_directory_leaves_nothing) {
  TempDir t;
  SafetensorsWriter w;
  const float f[] = {1, 2};
  w.add("a", {2}, f);
  const std::string p = t.file("no/such/dir/x.safetensors");
  expect_io_error([&] { w.write(p); }, {p, std::strerror(ENOENT)});
  BOOST_CHECK(!fs::exists(t.dir / "no"));
  BOOST_CHECK_EQUAL(t.entries(), 0u);
}

BOOST_AUTO_TEST_CASE(writer_failing_rename_removes_temp_file) {
  TempDir t;
  // The target path is a directory: everything is written, then the rename fails.
  const std::string p = t.file("target.safetensors");
  fs::create_directory(p);
  fs::path keep = fs::path(p) / "keep";
  spit(keep.string(), "x");
  SafetensorsWriter w;
  const float f[] = {1, 2};
  w.add("a", {2}, f);
  expect_io_error([&] { w.write(p); }, {p, "rename", std::strerror(EISDIR)});
  BOOST_CHECK(fs::is_directory(p));
  BOOST_CHECK_EQUAL(slurp(keep.string()), "x");
  BOOST_CHECK_EQUAL(t.entries(), 1u);  // no leftover temporary file
}

BOOST_AUTO_TEST_CASE(writer_failure_keeps_existing_file) {
  TempDir t;
  const std::string p = t.file("model.safetensors");
  SafetensorsWriter good;
  const double d[] = {1, 2, 3};
  good.add("d", {3}, d);
  good.write(p);
  const std::string before = slurp(p);

  // Block the temporary file name so the new write fails before touching the target.
  const std::string tmp = p + ".tmp." + std::to_string(::getpid());
  fs::create_directory(tmp);
  SafetensorsWriter bad;
  const float f[] = {9, 9};
  bad.add("other", {2}, f);
  expect_io_error([&] { bad.write(p); }, {p, "temporary file", std::strerror(EISDIR)});
  fs::remove(tmp);
  BOOST_CHECK(slurp(p) == before);
  BOOST_CHECK_EQUAL(t.entries(), 1u);
  BOOST_CHECK_EQUAL(SafetensorsFile(p).read<double>("d")[2], 3.0);

  // Overwriting with a successful write replaces the file.
  bad.write(p);
  BOOST_CHECK(SafetensorsFile(p).contains("other"));
  BOOST_CHECK(!SafetensorsFile(p).contains("d"));
  BOOST_CHECK_EQUAL(t.entries(), 1u);
}

BOOST_AUTO_TEST_CASE(writer_error_mid_write_keeps_existing_file) {
  TempDir t;
  const std::string p = t.file("model.safetensors");
  SafetensorsWriter good;
  const float small[] = {1, 2, 3};
  good.add("small", {3}, small);
  good.write(p);
  const std::string before = slurp(p);

  // A file-size limit makes write() fail with EFBIG part-way through, like a full disk.
  std::vector<float> big(1 << 16, 1.0f);
  SafetensorsWriter w;
  w.add("big", {index_t(big.size())}, big.data());
  struct rlimit old {};
  BOOST_REQUIRE_EQUAL(::getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old;
  lim.rlim_cur = 4096;
  BOOST_REQUIRE_EQUAL(::setrlimit(RLIMIT_FSIZE, &lim), 0);
  std::string what;
  try {
    w.write(p);
  } catch (const io_error& e) {
    what = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  BOOST_CHECK_MESSAGE(what.find(std::strerror(EFBIG)) != std::string::npos, "message: " << what);
  BOOST_CHECK_MESSAGE(what.find("write failed") != std::string::npos, "message: " << what);
  BOOST_CHECK(slurp(p) == before);
  BOOST_CHECK_EQUAL(t.entries(), 1u);  // temporary file removed
  BOOST_CHECK((SafetensorsFile(p).read<float>("small") == std::vector<float>{1, 2, 3}));
}

BOOST_AUTO_TEST_SUITE_END()
