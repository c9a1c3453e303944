//! The SSM emulator.
