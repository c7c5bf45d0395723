// C shim: exposes OpenBLAS's CBLAS interface (cblas_sgemm, cblas_sgemv, ...) and its thread
// controls to Swift. Debian's libopenblas-dev installs cblas.h through alternatives.
#ifndef VIST2_CBLAS_H
#define VIST2_CBLAS_H
#include <cblas.h>
#endif
