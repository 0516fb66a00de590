// Placeholder: being written (CUDA overloads of the teacher_ops).
#pragma once
