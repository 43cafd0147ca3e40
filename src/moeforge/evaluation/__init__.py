"""`moeforge eval`: lm-evaluation-harness tasks on a moeforge checkpoint (needs moeforge[eval])."""
