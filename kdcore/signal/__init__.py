"""TeacherSignal and its forms: dense, sparse (top-k), mixture, aligned."""
