"""Launch logic and demo of the MobileManipulationCore stack."""
