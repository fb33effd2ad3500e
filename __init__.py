"""VIST2 as an installed package. The three modules are also a Hub model repo's remote code, loaded flat."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration_vist2 import VIST2Config
from .modeling_vist2 import VIST2Cache, VIST2ForCausalLM, VIST2Model, VIST2PreTrainedModel
from .processing_vist2 import SKETCH_TOKEN, VIST2Processor, render_chunk, split_into_chunks

AutoConfig.register("vist2", VIST2Config, exist_ok=True)
AutoModel.register(VIST2Config, VIST2Model, exist_ok=True)
AutoModelForCausalLM.register(VIST2Config, VIST2ForCausalLM, exist_ok=True)
AutoProcessor.register(VIST2Config, VIST2Processor, exist_ok=True)

__all__ = ["VIST2Config", "VIST2Model", "VIST2ForCausalLM", "VIST2PreTrainedModel", "VIST2Cache", "VIST2Processor",
           "SKETCH_TOKEN", "render_chunk", "split_into_chunks"]
