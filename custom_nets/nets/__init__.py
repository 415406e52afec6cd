"""Networks of the joint image-volume method: ``f_intra``, ``f_inter`` and the pretraining network."""

from custom_nets.nets.deformable_attention import DeformableSliceAttention
from custom_nets.nets.joint_ssl import JointSSLNet, location_coordinates, sample_slice_mask, sample_slice_window
from custom_nets.nets.slice_encoder import SliceEncoder, SliceEncoderOutput
from custom_nets.nets.slice_transformer import SliceTransformer, SliceTransformerOutput, slice_position_encoding

__all__ = [
    "DeformableSliceAttention",
    "JointSSLNet",
    "location_coordinates",
    "SliceEncoder",
    "SliceEncoderOutput",
    "SliceTransformer",
    "SliceTransformerOutput",
    "sample_slice_mask",
    "sample_slice_window",
    "slice_position_encoding",
]
