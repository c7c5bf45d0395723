// Empty: SwiftPM needs one source file in a C target; everything lives in include/CBLAS.h.
#include "CBLAS.h"
