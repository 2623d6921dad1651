//! Size estimates for `measure`: how large a qcow2 file holding some data would be.
