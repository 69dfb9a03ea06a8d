#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "core/tensor.h"
#include "test_util.h"

using namespace moeforge;

TEST(DType, NamesRoundTrip) {
  for (auto t : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32, DType::I16, DType::I8,
                 DType::U8, DType::Bool, DType::F8_E4M3, DType::F8_E5M2})
    EXPECT_EQ(dtype_from_name(dtype_name(t)), t);
  EXPECT_FALSE(dtype_from_name("F31").has_value());
  EXPECT_EQ(dtype_from_torch_name("torch.bfloat16"), DType::BF16);
}

TEST(DType, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to the even one, 1.
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  // 1 + 3 * 2^-8 is between 1 + 2^-7 and 1 + 2^-6 at the tie: goes to 1 + 2^-6 (even mantissa).
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST(DType, F16ConversionsAreExactOnRepresentableValues) {
  for (float v : {0.f, 1.f, -2.5f, 65504.f, 6.1035156e-05f, 5.9604645e-08f, 0.333251953125f})
    EXPECT_EQ(f16_to_f32(f32_to_f16(v)), v) << v;
  EXPECT_TRUE(std::isinf(f16_to_f32(f32_to_f16(1e6f))));
}

TEST(Tensor, ViewAndSliceShareStorage) {
  Tensor t = Tensor::from_vector({0, 1, 2, 3, 4, 5}, {3, 2});
  Tensor v = t.view({2, -1});
  EXPECT_EQ(v.shape(), Shape({2, 3}));
  Tensor s = t.slice0(1, 2);
  EXPECT_EQ(s.item_f32(0), 2.f);
  s.f32()[0] = 42.f;
  EXPECT_EQ(t.item_f32(2), 42.f);
  EXPECT_THROW(t.view({4, 2}), Error);
  EXPECT_THROW(t.slice0(2, 2), Error);
}

TEST(Tensor, ConvertsBetweenDtypes) {
  Tensor t = Tensor::from_vector({1.5f, -2.25f, 3.f}, {3});
  Tensor b = t.to(DType::BF16).to(DType::F32);
  EXPECT_EQ(b.to_f32_vector(), t.to_f32_vector());
  Tensor i = Tensor::from_i64({7, -3}, {2}).to(DType::F32);
  EXPECT_EQ(i.to_f32_vector(), std::vector<float>({7.f, -3.f}));
  EXPECT_THROW(t.i64(), Error);
}
