// Placeholder: being written (CUDA overloads of the loss_ops).
#pragma once
