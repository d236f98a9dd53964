"""The contract between the converter and the vLLM plugin, in the standard library only: the manifest and its
seal (``manifest``), the routing contract of fused shared experts (``routing``), the names of prepared tensors
(``names``), the vLLM releases a recipe is for (``vllm_versions``) and which folders the plugin serves
(``serving``). The plugin imports nothing else of moeprep, so what it checks at load is what convert wrote."""
